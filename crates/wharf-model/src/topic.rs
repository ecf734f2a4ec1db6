//! Topic-exchange matching: a routing key and a binding pattern are dot-separated words; `*`
//! matches exactly one word, `#` zero or more. Matching is iterative with a bounded work list, so a
//! hostile pattern like `#.#.#.#…` cannot blow the stack or take exponential time.

/// True if `routing_key` matches `pattern`.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    // reachable[j] = pattern[..i] can match key[..j]; classic DP over words, O(|pattern|·|key|).
    let mut reachable = vec![false; key.len() + 1];
    reachable[0] = true;
    for word in &pattern {
        let mut next = vec![false; key.len() + 1];
        match *word {
            "#" => {
                let mut any = false;
                for (slot, reached) in next.iter_mut().zip(&reachable) {
                    any |= *reached;
                    *slot = any;
                }
            }
            "*" => next[1..].copy_from_slice(&reachable[..key.len()]),
            literal => {
                for (j, word) in key.iter().enumerate() {
                    next[j + 1] = reachable[j] && *word == literal;
                }
            }
        }
        reachable = next;
    }
    reachable[key.len()]
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn rabbitmq_topic_semantics() {
        let cases = [
            ("order.received", "order.received", true),
            ("order.*", "order.received", true),
            ("order.*", "order.received.eu", false),
            ("order.#", "order", true),
            ("order.#", "order.received.eu", true),
            ("#", "", true),
            ("#", "anything.at.all", true),
            ("*", "", true),
            ("*", "a.b", false),
            ("#.received", "order.received", true),
            ("#.received", "received", true),
            ("*.received", "received", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c", false),
            ("a.*.#", "a", false),
            ("a.*.#", "a.b", true),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(matches(pattern, key), expected, "{pattern:?} vs {key:?}");
        }
    }

    #[test]
    fn hostile_patterns_stay_cheap() {
        let pattern = vec!["#"; 200].join(".") + ".x";
        let key = vec!["a"; 200].join(".");
        assert!(!matches(&pattern, &key));
    }
}
