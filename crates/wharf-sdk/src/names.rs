//! Table and channel names an application may choose (`OutboxConfig`, `InboxConfig`), checked
//! once. Names are spliced into SQL text (identifiers cannot be bound parameters), so the check
//! here is what keeps a name from being SQL: one identifier, or `schema.table`, of ASCII letters,
//! digits and `_`, not starting with a digit, each part at most 63 bytes (PostgreSQL's limit).

use crate::{Result, SdkError};

/// Longest part of a name (PostgreSQL truncates identifiers beyond 63 bytes).
pub const IDENTIFIER_BYTES_MAX: usize = 63;

/// A checked table name: an optional schema and the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    table: String,
}

fn check_identifier(what: &str, name: &str, part: &str) -> Result<()> {
    let first_ok = part.chars().next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
    let rest_ok = part.chars().all(|char| char.is_ascii_alphanumeric() || char == '_');
    if !first_ok || !rest_ok || part.len() > IDENTIFIER_BYTES_MAX {
        return Err(SdkError::Config(format!(
            "{what} '{name}' is not a plain SQL name: use ASCII letters, digits and '_' (not first), \
             at most {IDENTIFIER_BYTES_MAX} bytes, optionally 'schema.table'"
        )));
    }
    Ok(())
}

impl TableName {
    /// Parses `table` or `schema.table`.
    pub fn parse(what: &str, name: &str) -> Result<TableName> {
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        if let Some(schema) = schema {
            check_identifier(what, name, schema)?;
        }
        check_identifier(what, name, table)?;
        Ok(TableName { schema: schema.map(str::to_owned), table: table.to_owned() })
    }

    /// One of the SDK's own default names (known to be valid; not checked again).
    pub(crate) fn default_name(table: &'static str) -> TableName {
        TableName { schema: None, table: table.to_owned() }
    }

    /// The table's own name, without its schema (index names are made from it).
    pub fn bare(&self) -> &str {
        &self.table
    }

    /// The schema, if one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The name as SQL refers to it (`schema.table` or `table`).
    pub fn qualified(&self) -> String {
        self.sibling(&self.table)
    }

    /// Another table in the same schema.
    pub fn sibling(&self, table: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{table}"),
            None => table.to_owned(),
        }
    }
}

/// Checks a PostgreSQL `NOTIFY` channel name (one identifier).
pub fn check_channel(name: &str) -> Result<String> {
    check_identifier("the notification channel", name, name)?;
    Ok(name.to_owned())
}

/// Renames the default table name in SQL written for it: the token `default` becomes the
/// qualified name, and tokens `default_<suffix>` (index names) become `<bare>_<suffix>`. Tokens
/// are maximal runs of identifier characters, so no other word is touched.
pub fn rename_table(sql: &str, default: &str, name: &TableName) -> String {
    let mut out = String::with_capacity(sql.len() + 32);
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token == default {
            out.push_str(&name.qualified());
        } else if let Some(suffix) = token.strip_prefix(default).and_then(|rest| rest.strip_prefix('_')) {
            out.push_str(name.bare());
            out.push('_');
            out.push_str(suffix);
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for char in sql.chars() {
        if char.is_ascii_alphanumeric() || char == '_' {
            token.push(char);
        } else {
            flush(&mut token, &mut out);
            out.push(char);
        }
    }
    flush(&mut token, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_identifiers_or_refused_with_the_reason() {
        assert_eq!(TableName::parse("t", "outbox").unwrap().qualified(), "outbox");
        assert_eq!(TableName::parse("t", "app.outbox_2").unwrap().qualified(), "app.outbox_2");
        for bad in ["", "1table", "a.b.c", "x; DROP TABLE y", "a-b", "\"quoted\"", "schema.", ".table", "é"] {
            let error = TableName::parse("the outbox table", bad).unwrap_err().to_string();
            assert!(error.contains("the outbox table"), "{bad}: {error}");
        }
        assert!(TableName::parse("t", &"x".repeat(64)).is_err());
        assert!(check_channel("wharf_outbox").is_ok());
        assert!(check_channel("a.b").is_err());
    }

    #[test]
    fn renaming_touches_the_table_and_its_index_names_only() {
        let name = TableName::parse("t", "app.events").unwrap();
        let sql = "CREATE INDEX IF NOT EXISTS wharf_outbox_sent ON wharf_outbox (sent_at); -- wharf_outboxes";
        assert_eq!(
            rename_table(sql, "wharf_outbox", &name),
            "CREATE INDEX IF NOT EXISTS events_sent ON app.events (sent_at); -- wharf_outboxes"
        );
    }
}
