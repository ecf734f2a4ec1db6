//! The `definitions` target's checks: a RabbitMQ definitions file (`--definitions`), read by
//! `wharf_broker::Definitions::parse`. Whatever the bytes, parsing returns definitions or an error
//! naming the problem; never a panic, never unbounded work. What parses is checked further: the
//! same bytes parse to the same result again, and folding them into a configuration gives one the
//! broker's own validation accepts or refuses with a message (permissions and policies were
//! checked while parsing, so the result must be usable).

use wharf_broker::{BrokerConfig, Definitions};

/// Parses `data` as a definitions file and checks what comes out.
pub fn check_definitions(data: &[u8]) {
    let Ok(definitions) = Definitions::parse(data) else { return };
    let again = Definitions::parse(data).expect("the same bytes parse the same way twice");
    assert_eq!(definitions.users.len(), again.users.len());
    assert_eq!(definitions.warnings, again.warnings);
    assert_eq!(definitions.topology, again.topology);
    let mut config = BrokerConfig::new("/data");
    config.import_definitions(definitions);
    if let Err(error) = config.validate() {
        // Only settings the file cannot make invalid through parsing may fail here (names of
        // vhosts, say), and they fail with a message.
        assert!(!error.0.is_empty());
    }
    // Importing is idempotent for what decides access.
    let permissions = config.permissions.clone();
    let users = config.users.len();
    config.import_definitions(again);
    assert_eq!(config.permissions, permissions);
    assert_eq!(config.users.len(), users);
}

/// Seeds of the `definitions` target: a RabbitMQ 3.10 export with every section, and a small one.
pub fn definitions_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![("export", EXPORT.as_bytes().to_vec()), ("small", SMALL.as_bytes().to_vec())]
}

const EXPORT: &str = r##"{"rabbit_version":"3.10.8","rabbitmq_version":"3.10.8","product_name":"RabbitMQ","product_version":"3.10.8",
"users":[{"name":"test","password_hash":"kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR","hashing_algorithm":"rabbit_password_hashing_sha256","tags":["administrator"],"limits":{"max-connections":10}},
{"name":"old","password_hash":"","tags":"management,monitoring"}],
"vhosts":[{"name":"/","description":"","tags":[],"metadata":{}},{"name":"orders","limits":{"max-queues":10}}],
"permissions":[{"user":"test","vhost":"orders","configure":"^app\\.","write":".*","read":".*"}],
"topic_permissions":[{"user":"test","vhost":"orders","exchange":"amq.topic","write":"^{username}\\.","read":".*"}],
"parameters":[{"vhost":"orders","component":"vhost-limits","name":"limits","value":{"max-connections":5}}],
"global_parameters":[{"name":"cluster_name","value":"rabbit@host"}],
"policies":[{"vhost":"orders","name":"dlx","pattern":"^app\\.","apply-to":"queues","definition":{"dead-letter-exchange":"dead","delivery-limit":5,"ha-mode":"all"},"priority":1}],
"queues":[{"name":"app.q","vhost":"orders","durable":true,"auto_delete":false,"arguments":{"x-queue-type":"quorum","x-max-length":100}}],
"exchanges":[{"name":"app.x","vhost":"orders","type":"topic","durable":true,"auto_delete":false,"internal":false,"arguments":{"alternate-exchange":"app.ae"}}],
"bindings":[{"source":"app.x","vhost":"orders","destination":"app.q","destination_type":"queue","routing_key":"#","arguments":{"x-match":"all"}}]}"##;

const SMALL: &str = r#"{"vhosts":[{"name":"v"}],"queues":[{"name":"q","vhost":"v","durable":false,"arguments":{}}]}"#;
