//! A limit on how deeply field tables and arrays nest, checked before anything parses them.
//!
//! amq-protocol's table parser recurses once per level of nesting, so a peer could send a table
//! nested a few thousand levels deep (a few kilobytes) and overflow the stack of whatever thread
//! parses it, aborting the whole broker. Every table that arrives from the network or the disk is
//! first walked here, without recursion, and refused if it nests deeper than
//! [`FIELD_NESTING_DEPTH_MAX`]. Where tables sit in a method's arguments or a content header's
//! properties is found from the protocol's layouts ([`method_table_offset`],
//! [`properties_table_offset`]).
//!
//! The walk only judges depth: bytes it cannot make sense of (a truncated length, an unknown type
//! tag) are left for the parser, which refuses them as malformed.

/// Deepest nesting of tables and arrays accepted (the outermost table is level 1). Real arguments
/// and headers nest a few levels (RabbitMQ's `x-death` is three); 64 leaves room for any real use
/// and keeps the parser's recursion far from the stack's end.
pub const FIELD_NESTING_DEPTH_MAX: usize = 64;

/// A table nested deeper than [`FIELD_NESTING_DEPTH_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep;

/// What a container on the walk's stack is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    /// Entries are a short-string name, then a value.
    Table,
    /// Entries are values.
    Array,
}

/// Checks the table that starts at `bytes[0]` (a 32-bit length, then its entries).
pub fn check_table(bytes: &[u8]) -> Result<(), TooDeep> {
    let Some(end) = read_length(bytes, 0).map(|length| 4 + length) else { return Ok(()) };
    walk(bytes, 4, end.min(bytes.len()), Container::Table)
}

/// Checks a table's entries without their length prefix (the form SASL's AMQPLAIN uses).
pub fn check_table_entries(bytes: &[u8]) -> Result<(), TooDeep> {
    walk(bytes, 0, bytes.len(), Container::Table)
}

/// Walks the entries of a container spanning `start..end` of `bytes`, with an explicit stack of
/// the containers it is inside (so a hostile depth costs heap, bounded by the limit, not stack).
fn walk(bytes: &[u8], start: usize, end: usize, root: Container) -> Result<(), TooDeep> {
    let mut stack: Vec<(Container, usize)> = vec![(root, end)];
    let mut position = start;
    while let Some(&(container, container_end)) = stack.last() {
        if position >= container_end {
            stack.pop();
            continue;
        }
        if container == Container::Table {
            let Some(&name_length) = bytes.get(position) else { return Ok(()) };
            position += 1 + usize::from(name_length);
        }
        let Some(&tag) = bytes.get(position) else { return Ok(()) };
        position += 1;
        let fixed = match tag {
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'D' => 5,
            b'V' => 0,
            b'S' | b'x' => match read_length(bytes, position) {
                Some(length) => 4 + length,
                None => return Ok(()),
            },
            b'F' | b'A' => {
                let Some(length) = read_length(bytes, position) else { return Ok(()) };
                let nested = if tag == b'F' { Container::Table } else { Container::Array };
                let nested_end = (position + 4 + length).min(container_end);
                if stack.len() >= FIELD_NESTING_DEPTH_MAX {
                    return Err(TooDeep);
                }
                stack.push((nested, nested_end));
                position += 4;
                continue;
            }
            // Not a type this dialect has: the parser refuses it.
            _ => return Ok(()),
        };
        position += fixed;
    }
    Ok(())
}

/// A 32-bit big-endian length at `position`.
fn read_length(bytes: &[u8], position: usize) -> Option<usize> {
    let length = bytes.get(position..position.checked_add(4)?)?;
    Some(u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize)
}

/// Where a method's field table starts in its arguments (the payload after the class and method
/// ids), for the methods that carry one; `None` for the rest, or when the arguments are too short
/// to hold it (the parser then refuses them).
pub fn method_table_offset(class_id: u16, method_id: u16, arguments: &[u8]) -> Option<usize> {
    /// The fields before the table, in order.
    enum Field {
        Octet,
        Short,
        ShortString,
    }
    use Field::{Octet, Short, ShortString};
    let before: &[Field] = match (class_id, method_id) {
        // connection.start: version-major, version-minor, server-properties.
        (10, 10) => &[Octet, Octet],
        // connection.start-ok: client-properties first.
        (10, 11) => &[],
        // exchange.declare: reserved, exchange, type, flags, arguments.
        (40, 10) => &[Short, ShortString, ShortString, Octet],
        // exchange.bind / exchange.unbind: reserved, destination, source, routing key, no-wait.
        (40, 30) | (40, 40) => &[Short, ShortString, ShortString, ShortString, Octet],
        // queue.declare: reserved, queue, flags.
        (50, 10) => &[Short, ShortString, Octet],
        // queue.bind: reserved, queue, exchange, routing key, no-wait.
        (50, 20) => &[Short, ShortString, ShortString, ShortString, Octet],
        // queue.unbind: reserved, queue, exchange, routing key (no flags).
        (50, 50) => &[Short, ShortString, ShortString, ShortString],
        // basic.consume: reserved, queue, consumer tag, flags.
        (60, 20) => &[Short, ShortString, ShortString, Octet],
        _ => return None,
    };
    let mut position = 0usize;
    for field in before {
        position += match field {
            Octet => 1,
            Short => 2,
            ShortString => 1 + usize::from(*arguments.get(position)?),
        };
    }
    (position < arguments.len()).then_some(position)
}

/// Where the `headers` table starts in a basic content header's raw properties (flags, then the
/// properties present), if it is present.
pub fn properties_table_offset(raw_properties: &[u8]) -> Option<usize> {
    const CONTENT_TYPE: u16 = 1 << 15;
    const CONTENT_ENCODING: u16 = 1 << 14;
    const HEADERS: u16 = 1 << 13;
    let flags = u16::from_be_bytes([*raw_properties.first()?, *raw_properties.get(1)?]);
    if flags & HEADERS == 0 {
        return None;
    }
    let mut position = 2usize;
    for present in [CONTENT_TYPE, CONTENT_ENCODING] {
        if flags & present != 0 {
            position += 1 + usize::from(*raw_properties.get(position)?);
        }
    }
    (position < raw_properties.len()).then_some(position)
}

/// A table holding one entry `"n"` whose value is a table nested `depth - 1` more levels (so
/// the whole is `depth` tables deep), built without recursion (the codec's encoder recurses).
#[cfg(test)]
pub(crate) fn nested_tables(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = 0u32.to_be_bytes().to_vec();
    for _ in 1..depth {
        let mut entries = vec![1, b'n', b'F'];
        entries.extend_from_slice(&inner);
        let mut table = (entries.len() as u32).to_be_bytes().to_vec();
        table.extend(entries);
        inner = table;
    }
    inner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_up_to_the_limit_pass_and_one_level_more_is_refused() {
        assert_eq!(check_table(&nested_tables(1)), Ok(()));
        assert_eq!(check_table(&nested_tables(FIELD_NESTING_DEPTH_MAX)), Ok(()));
        assert_eq!(check_table(&nested_tables(FIELD_NESTING_DEPTH_MAX + 1)), Err(TooDeep));
        assert_eq!(check_table(&nested_tables(5_000)), Err(TooDeep), "the depth that aborted the parser");
    }

    #[test]
    fn arrays_count_as_levels_and_other_values_are_skipped_whole() {
        // {"a": [1, "x", [ [] ]], "b": true}: the innermost array is level 4.
        let innermost = [b'A', 0, 0, 0, 0];
        let mut middle = vec![b'A'];
        middle.extend((innermost.len() as u32).to_be_bytes());
        middle.extend(innermost);
        let mut items = vec![b'I', 0, 0, 0, 1, b'S', 0, 0, 0, 1, b'x'];
        items.extend(&middle);
        let mut entries = vec![1, b'a', b'A'];
        entries.extend((items.len() as u32).to_be_bytes());
        entries.extend(items);
        entries.extend([1, b'b', b't', 1]);
        let mut table = (entries.len() as u32).to_be_bytes().to_vec();
        table.extend(&entries);
        assert_eq!(check_table(&table), Ok(()));
        assert_eq!(check_table_entries(&entries), Ok(()));
    }

    #[test]
    fn bytes_that_do_not_parse_are_left_to_the_parser() {
        assert_eq!(check_table(&[]), Ok(()));
        assert_eq!(check_table(&[0, 0, 0, 9, 1]), Ok(()), "truncated");
        assert_eq!(check_table(&[0, 0, 0, 3, 1, b'k', b'?']), Ok(()), "unknown tag");
    }

    #[test]
    fn tables_are_found_where_the_methods_and_properties_keep_them() {
        // queue.declare: reserved 0, queue "q", flags, then the table.
        let arguments = [0, 0, 1, b'q', 0b10, 0, 0, 0, 0];
        assert_eq!(method_table_offset(50, 10, &arguments), Some(5));
        assert_eq!(method_table_offset(50, 10, &arguments[..5]), None, "no room for the table");
        assert_eq!(method_table_offset(60, 40, &arguments), None, "basic.publish carries no table");
        // content-type "t", no encoding, headers.
        let properties = [0b1010_0000, 0, 1, b't', 0, 0, 0, 0];
        assert_eq!(properties_table_offset(&properties), Some(4));
        assert_eq!(properties_table_offset(&[0b1000_0000, 0, 1, b't']), None, "no headers");
    }
}
