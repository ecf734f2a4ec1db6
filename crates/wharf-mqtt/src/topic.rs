//! Topic names and filters (section 4.7): what is allowed, shared subscriptions
//! (`$share/<group>/<filter>`), and the mapping to and from AMQP routing keys that RabbitMQ's MQTT
//! plugin uses (`/` and `.` are level separators, `+` is `*`), so that MQTT publishes and AMQP
//! bindings on `amq.topic` meet.

/// Longest topic name or filter (the two-byte length of an MQTT string).
pub const TOPIC_BYTES_MAX: usize = 65_535;

/// A topic name a PUBLISH (or a will, or a response topic) may carry: not empty, no wildcards, no
/// NUL. The text says what is wrong.
pub fn check_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("an empty topic name".into());
    }
    if topic.len() > TOPIC_BYTES_MAX {
        return Err(format!("a topic name of {} bytes", topic.len()));
    }
    if topic.contains(['+', '#']) {
        return Err(format!("topic name '{topic}' contains a wildcard"));
    }
    if topic.contains('\0') {
        return Err("a topic name with the null character".into());
    }
    Ok(())
}

/// A topic filter: not empty; `#` only as the whole last level; `+` only as a whole level.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("an empty topic filter".into());
    }
    if filter.len() > TOPIC_BYTES_MAX {
        return Err(format!("a topic filter of {} bytes", filter.len()));
    }
    if filter.contains('\0') {
        return Err("a topic filter with the null character".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (index, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || index + 1 != levels.len()) {
            return Err(format!("topic filter '{filter}': '#' must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("topic filter '{filter}': '+' must be a whole level"));
        }
    }
    Ok(())
}

/// A subscription's filter, taken apart: `$share/<group>/<filter>` is shared by `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Parses and checks a subscription's filter, shared ones included.
pub fn parse_filter(text: &str) -> Result<ParsedFilter<'_>, String> {
    if let Some(rest) = text.strip_prefix("$share/") {
        let Some((group, filter)) = rest.split_once('/') else {
            return Err(format!("shared subscription '{text}' has no topic filter"));
        };
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(format!("shared subscription '{text}': the share name must be non-empty, without wildcards"));
        }
        check_filter(filter)?;
        return Ok(ParsedFilter { share_group: Some(group), filter });
    }
    check_filter(text)?;
    Ok(ParsedFilter { share_group: None, filter: text })
}

/// An MQTT topic name or filter as an AMQP routing key or binding key: `/` and `.` both become
/// `.`, `+` becomes `*`, `#` stays (RabbitMQ's `mqtt_to_amqp`).
pub fn to_amqp(topic: &str) -> String {
    topic
        .chars()
        .map(|character| match character {
            '/' => '.',
            '+' => '*',
            other => other,
        })
        .collect()
}

/// An AMQP routing key as the MQTT topic a subscriber receives: `.` becomes `/`, `*` becomes `+`
/// (RabbitMQ's `amqp_to_mqtt`).
pub fn to_mqtt(routing_key: &str) -> String {
    routing_key
        .chars()
        .map(|character| match character {
            '.' => '/',
            '*' => '+',
            other => other,
        })
        .collect()
}

/// Whether a topic name matches a filter (section 4.7): `+` one level, `#` this level and every
/// one below (the parent too); a filter starting with a wildcard does not match a topic starting
/// with `$`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (expected, Some(actual)) if expected == actual => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_the_wildcard_rules() {
        for good in ["a", "a/b", "#", "+", "a/+/c", "a/#", "+/+", "/", "a//b", "sport/tennis/#"] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "a/##"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_refuse_wildcards() {
        assert!(check_name("a/b").is_ok());
        assert!(check_name("a/+").is_err());
        assert!(check_name("#").is_err());
        assert!(check_name("").is_err());
    }

    #[test]
    fn shared_subscriptions_name_a_group_and_a_filter() {
        assert_eq!(parse_filter("$share/g1/a/+").unwrap(), ParsedFilter { share_group: Some("g1"), filter: "a/+" });
        assert!(parse_filter("$share/g1").is_err());
        assert!(parse_filter("$share//a").is_err());
        assert!(parse_filter("$share/g+/a").is_err());
        assert_eq!(parse_filter("a/#").unwrap().share_group, None);
    }

    #[test]
    fn topics_map_to_routing_keys_as_rabbitmq_maps_them() {
        assert_eq!(to_amqp("sensors/+/temp/#"), "sensors.*.temp.#");
        assert_eq!(to_amqp("a.b/c"), "a.b.c");
        assert_eq!(to_mqtt("sensors.kitchen.temp"), "sensors/kitchen/temp");
    }

    #[test]
    fn matching_follows_the_specification() {
        assert!(matches("sport/tennis/#", "sport/tennis"));
        assert!(matches("sport/tennis/#", "sport/tennis/player1/score"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(!matches("#", "$SYS/uptime"));
        assert!(matches("$SYS/#", "$SYS/uptime"));
        assert!(!matches("a/b", "a/b/c"));
    }
}
