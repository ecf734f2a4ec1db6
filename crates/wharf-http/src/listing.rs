//! Lists as RabbitMQ's management API returns them: filtered by `name` (a substring, or a regular
//! expression with `use_regex=true`, both ignoring case), sorted by `sort` (a field, dotted for
//! nested ones: `message_stats.publish_details.rate`) and `sort_reverse`, cut to `columns`, and
//! with `page` a page object (`items`, `page`, `page_count`, `page_size`, `filtered_count`,
//! `item_count`, `total_count`) instead of a plain array.

use crate::error::ApiError;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::cmp::Ordering;

/// The most items on one page (RabbitMQ's limit).
pub const PAGE_SIZE_MAX: usize = 500;
/// Items on a page when `page_size` is not given.
pub const PAGE_SIZE_DEFAULT: usize = 100;
/// The longest `name` filter accepted as a regular expression (a bound on compiling it).
const NAME_PATTERN_BYTES_MAX: usize = 1024;

/// The query parameters of a list.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub page: Option<String>,
    pub page_size: Option<String>,
    pub name: Option<String>,
    pub use_regex: Option<String>,
    pub sort: Option<String>,
    pub sort_reverse: Option<String>,
    pub columns: Option<String>,
}

fn flag(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|text| text.eq_ignore_ascii_case("true"))
}

/// The field at a dotted path of a JSON object.
pub fn field<'a>(item: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(item, |value, key| value.get(key))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(a)), Some(Value::Number(b))) => {
            a.as_f64().unwrap_or(0.0).partial_cmp(&b.as_f64().unwrap_or(0.0)).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(a)), Some(Value::String(b))) => a.cmp(b),
        (Some(Value::Bool(a)), Some(Value::Bool(b))) => a.cmp(b),
        (None | Some(Value::Null), None | Some(Value::Null)) => Ordering::Equal,
        (None | Some(Value::Null), _) => Ordering::Less,
        (_, None | Some(Value::Null)) => Ordering::Greater,
        (Some(a), Some(b)) => a.to_string().cmp(&b.to_string()),
    }
}

/// Only the fields named in `columns` (dotted paths keep their nesting).
fn select_columns(item: &Value, columns: &[&str]) -> Value {
    let mut selected = Map::new();
    for column in columns {
        if let Some(value) = field(item, column) {
            let keys: Vec<&str> = column.split('.').collect();
            insert_path(&mut selected, &keys, value.clone());
        }
    }
    Value::Object(selected)
}

/// Puts `value` at `keys` in `map`, creating the objects on the way.
fn insert_path(map: &mut Map<String, Value>, keys: &[&str], value: Value) {
    match keys {
        [] => {}
        [last] => {
            map.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = map.entry((*first).to_owned()).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(next) = entry {
                insert_path(next, rest, value);
            }
        }
    }
}

/// Applies `columns` to one object (`overview`, one queue), as RabbitMQ does for them too.
pub fn respond_object(item: Value, query: &ListQuery) -> Value {
    match query.columns.as_deref().filter(|columns| !columns.is_empty()) {
        Some(columns) => {
            let columns: Vec<&str> = columns.split(',').map(str::trim).filter(|column| !column.is_empty()).collect();
            select_columns(&item, &columns)
        }
        None => item,
    }
}

/// Applies the query to `items` (each a JSON object with a `name`).
pub fn respond(mut items: Vec<Value>, query: &ListQuery) -> Result<Value, ApiError> {
    let total_count = items.len();
    let paged = query.page.is_some();
    if paged && let Some(name) = query.name.as_deref().filter(|name| !name.is_empty()) {
        let pattern = if flag(&query.use_regex) { name.to_owned() } else { regex::escape(name) };
        if pattern.len() > NAME_PATTERN_BYTES_MAX {
            return Err(ApiError::bad_request(format!("the name filter is over {NAME_PATTERN_BYTES_MAX} bytes")));
        }
        let matcher =
            regex::RegexBuilder::new(&pattern).case_insensitive(true).size_limit(1 << 20).build().map_err(|error| {
                ApiError::bad_request(format!("the name filter is not a valid regular expression: {error}"))
            })?;
        items.retain(|item| field(item, "name").and_then(Value::as_str).is_some_and(|name| matcher.is_match(name)));
    }
    if let Some(sort) = query.sort.as_deref().filter(|sort| !sort.is_empty()) {
        items.sort_by(|a, b| compare(field(a, sort), field(b, sort)));
    }
    if flag(&query.sort_reverse) {
        items.reverse();
    }
    if let Some(columns) = query.columns.as_deref().filter(|columns| !columns.is_empty()) {
        let columns: Vec<&str> = columns.split(',').map(str::trim).filter(|column| !column.is_empty()).collect();
        items = items.iter().map(|item| select_columns(item, &columns)).collect();
    }
    if !paged {
        return Ok(Value::Array(items));
    }
    let page: usize = number(query.page.as_deref(), "page")?.unwrap_or(1);
    let page_size: usize = number(query.page_size.as_deref(), "page_size")?.unwrap_or(PAGE_SIZE_DEFAULT);
    if page == 0 || page_size == 0 || page_size > PAGE_SIZE_MAX {
        return Err(ApiError::bad_request_named(
            "invalid_pagination_parameters",
            format!(
                "Invalid pagination parameters: page number {page}, page size {page_size} (at most {PAGE_SIZE_MAX})"
            ),
        ));
    }
    let filtered_count = items.len();
    let page_count = filtered_count.div_ceil(page_size);
    if filtered_count > 0 && page > page_count {
        return Err(ApiError::bad_request_named(
            "page_out_of_range",
            format!("Page out of range, page: {page} page size: {page_size}, len: {filtered_count}"),
        ));
    }
    let start = (page - 1).saturating_mul(page_size);
    let page_items: Vec<Value> = items.into_iter().skip(start).take(page_size).collect();
    Ok(json!({
        "filtered_count": filtered_count,
        "item_count": page_items.len(),
        "items": page_items,
        "page": page,
        "page_count": page_count,
        "page_size": page_size,
        "total_count": total_count,
    }))
}

fn number(text: Option<&str>, what: &str) -> Result<Option<usize>, ApiError> {
    text.map(|text| {
        text.parse::<usize>().map_err(|_| ApiError::bad_request(format!("Pagination parameters are invalid: {what}")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(value: &Value) -> Vec<&str> {
        let items = value.get("items").unwrap_or(value).as_array().unwrap();
        items.iter().map(|item| item["name"].as_str().unwrap()).collect()
    }

    fn queues() -> Vec<Value> {
        vec![
            json!({"name": "orders", "messages": 5, "arguments": {"x-max-priority": 3}}),
            json!({"name": "Payments", "messages": 1, "arguments": {}}),
            json!({"name": "orders.dlq", "messages": 9, "arguments": {}}),
        ]
    }

    #[test]
    fn pages_filter_by_name_ignoring_case_and_count_everything() {
        let query = ListQuery {
            page: Some("1".into()),
            page_size: Some("1".into()),
            name: Some("ORDERS".into()),
            ..Default::default()
        };
        let page = respond(queues(), &query).unwrap();
        assert_eq!(names(&page), ["orders"]);
        assert_eq!(
            (page["filtered_count"].as_u64(), page["total_count"].as_u64(), page["page_count"].as_u64()),
            (Some(2), Some(3), Some(2))
        );
        let query = ListQuery {
            page: Some("3".into()),
            page_size: Some("1".into()),
            name: Some("orders".into()),
            ..Default::default()
        };
        assert!(respond(queues(), &query).is_err());
    }

    #[test]
    fn regular_expressions_sorting_and_columns() {
        let query = ListQuery {
            page: Some("1".into()),
            name: Some("^o.*q$".into()),
            use_regex: Some("true".into()),
            ..Default::default()
        };
        assert_eq!(names(&respond(queues(), &query).unwrap()), ["orders.dlq"]);
        let query =
            ListQuery { sort: Some("messages".into()), sort_reverse: Some("true".into()), ..Default::default() };
        assert_eq!(names(&respond(queues(), &query).unwrap()), ["orders.dlq", "orders", "Payments"]);
        let query = ListQuery { columns: Some("name,arguments.x-max-priority".into()), ..Default::default() };
        let listed = respond(queues(), &query).unwrap();
        assert_eq!(listed[0], json!({"name": "orders", "arguments": {"x-max-priority": 3}}));
        assert_eq!(listed[1], json!({"name": "Payments"}));
    }

    #[test]
    fn bad_paging_parameters_are_refused() {
        for (page, size) in [("0", "10"), ("1", "501"), ("x", "10"), ("1", "0")] {
            let query = ListQuery { page: Some(page.into()), page_size: Some(size.into()), ..Default::default() };
            assert!(respond(queues(), &query).is_err(), "page {page} size {size}");
        }
    }
}
