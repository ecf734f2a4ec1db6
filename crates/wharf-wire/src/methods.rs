//! The methods of AMQP 0-9-1 with RabbitMQ's extensions, by class and method id: used to tell an
//! unknown method (540 NOT_IMPLEMENTED) from a malformed known one (502 SYNTAX_ERROR), and to name
//! methods in errors and logs.

use amq_protocol::protocol::AMQPClass;

/// The class id of `basic` (publishes, deliveries, content headers).
pub const BASIC_CLASS_ID: u16 = 60;

/// Which method something was about, as `connection.close` and `channel.close` name it (the
/// class and method ids of the method that caused the close, or zeros for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodId {
    pub class_id: u16,
    pub method_id: u16,
}

impl MethodId {
    /// No method: a close not caused by one (a frame error, a shutdown).
    pub const NONE: MethodId = MethodId { class_id: 0, method_id: 0 };
    /// `connection.start-ok` (credentials).
    pub const CONNECTION_START_OK: MethodId = MethodId { class_id: 10, method_id: 11 };
    /// `connection.tune-ok`.
    pub const CONNECTION_TUNE_OK: MethodId = MethodId { class_id: 10, method_id: 31 };
    /// `connection.open` (the vhost).
    pub const CONNECTION_OPEN: MethodId = MethodId { class_id: 10, method_id: 40 };
    /// `basic.publish`, which content frames belong to.
    pub const BASIC_PUBLISH: MethodId = MethodId { class_id: BASIC_CLASS_ID, method_id: 40 };

    /// The ids of a decoded method.
    pub fn of(method: &AMQPClass) -> MethodId {
        MethodId { class_id: method.get_amqp_class_id(), method_id: method.get_amqp_method_id() }
    }
}

impl std::fmt::Display for MethodId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match name(self.class_id, self.method_id) {
            Some(name) => formatter.write_str(name),
            None => write!(formatter, "{}.{}", self.class_id, self.method_id),
        }
    }
}

/// The `class.method` name of a known method, or `None`.
pub fn name(class_id: u16, method_id: u16) -> Option<&'static str> {
    Some(match (class_id, method_id) {
        (10, 10) => "connection.start",
        (10, 11) => "connection.start-ok",
        (10, 20) => "connection.secure",
        (10, 21) => "connection.secure-ok",
        (10, 30) => "connection.tune",
        (10, 31) => "connection.tune-ok",
        (10, 40) => "connection.open",
        (10, 41) => "connection.open-ok",
        (10, 50) => "connection.close",
        (10, 51) => "connection.close-ok",
        (10, 60) => "connection.blocked",
        (10, 61) => "connection.unblocked",
        (10, 70) => "connection.update-secret",
        (10, 71) => "connection.update-secret-ok",
        (20, 10) => "channel.open",
        (20, 11) => "channel.open-ok",
        (20, 20) => "channel.flow",
        (20, 21) => "channel.flow-ok",
        (20, 40) => "channel.close",
        (20, 41) => "channel.close-ok",
        (30, 10) => "access.request",
        (30, 11) => "access.request-ok",
        (40, 10) => "exchange.declare",
        (40, 11) => "exchange.declare-ok",
        (40, 20) => "exchange.delete",
        (40, 21) => "exchange.delete-ok",
        (40, 30) => "exchange.bind",
        (40, 31) => "exchange.bind-ok",
        (40, 40) => "exchange.unbind",
        (40, 51) => "exchange.unbind-ok",
        (50, 10) => "queue.declare",
        (50, 11) => "queue.declare-ok",
        (50, 20) => "queue.bind",
        (50, 21) => "queue.bind-ok",
        (50, 30) => "queue.purge",
        (50, 31) => "queue.purge-ok",
        (50, 40) => "queue.delete",
        (50, 41) => "queue.delete-ok",
        (50, 50) => "queue.unbind",
        (50, 51) => "queue.unbind-ok",
        (60, 10) => "basic.qos",
        (60, 11) => "basic.qos-ok",
        (60, 20) => "basic.consume",
        (60, 21) => "basic.consume-ok",
        (60, 30) => "basic.cancel",
        (60, 31) => "basic.cancel-ok",
        (60, 40) => "basic.publish",
        (60, 50) => "basic.return",
        (60, 60) => "basic.deliver",
        (60, 70) => "basic.get",
        (60, 71) => "basic.get-ok",
        (60, 72) => "basic.get-empty",
        (60, 80) => "basic.ack",
        (60, 90) => "basic.reject",
        (60, 100) => "basic.recover-async",
        (60, 110) => "basic.recover",
        (60, 111) => "basic.recover-ok",
        (60, 120) => "basic.nack",
        (85, 10) => "confirm.select",
        (85, 11) => "confirm.select-ok",
        (90, 10) => "tx.select",
        (90, 11) => "tx.select-ok",
        (90, 20) => "tx.commit",
        (90, 21) => "tx.commit-ok",
        (90, 30) => "tx.rollback",
        (90, 31) => "tx.rollback-ok",
        _ => return None,
    })
}
