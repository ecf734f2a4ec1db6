//! A minimal AMQP 0-9-1 client for the idle-scale scenario (S7): it opens a connection, one
//! channel and one consumer, and then only holds the socket.
//!
//! Why not lapin: lapin runs an I/O thread per connection and gives each connection frame buffers
//! sized by `frame_max` (megabytes, zeroed), so 10,000 idle lapin connections took 24 GB of the
//! client's memory and were killed by the OOM killer on this machine. An idle connection needs none
//! of that: a tokio task with a socket is a few kilobytes, so the client can open as many
//! connections as the broker is asked to hold. The frames are written by hand (the handshake's
//! five methods); heartbeats are turned off in `tune-ok`, so nothing has to be answered while the
//! connection idles.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and as whom to connect, taken from an `amqp://user:password@host:port/vhost` URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    address: String,
    user: String,
    password: String,
    vhost: String,
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| text.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                index += 3;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Target {
    pub(crate) fn from_url(url: &str) -> Result<Target> {
        let rest = url.strip_prefix("amqp://").context("the idle client speaks plain amqp:// only")?;
        let (credentials, rest) = rest.split_once('@').unwrap_or(("guest:guest", rest));
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (address, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let vhost = if vhost.is_empty() { "/".to_owned() } else { percent_decoded(vhost) };
        Ok(Target {
            address: address.to_owned(),
            user: percent_decoded(user),
            password: percent_decoded(password),
            vhost,
        })
    }
}

fn short_string(out: &mut Vec<u8>, text: &str) {
    out.push(text.len().min(255) as u8);
    out.extend_from_slice(&text.as_bytes()[..text.len().min(255)]);
}

async fn send_method(socket: &mut TcpStream, channel: u16, class: u16, method: u16, arguments: &[u8]) -> Result<()> {
    let mut frame = vec![1u8];
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&((4 + arguments.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&class.to_be_bytes());
    frame.extend_from_slice(&method.to_be_bytes());
    frame.extend_from_slice(arguments);
    frame.push(0xCE);
    socket.write_all(&frame).await.context("writing a frame")
}

/// Reads frames until a method frame; returns (class, method, arguments). A `connection.close` or
/// `channel.close` from the broker is an error with its reply text.
async fn read_method(socket: &mut TcpStream) -> Result<(u16, u16, Vec<u8>)> {
    loop {
        let mut header = [0u8; 7];
        socket.read_exact(&mut header).await.context("reading a frame header")?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        if size > 1024 * 1024 {
            bail!("a {size}-byte frame during the handshake");
        }
        let mut payload = vec![0u8; size + 1];
        socket.read_exact(&mut payload).await.context("reading a frame")?;
        if header[0] != 1 || size < 4 {
            continue;
        }
        let class = u16::from_be_bytes([payload[0], payload[1]]);
        let method = u16::from_be_bytes([payload[2], payload[3]]);
        let arguments = payload[4..size].to_vec();
        if (class, method) == (10, 50) || (class, method) == (20, 40) {
            let text_len = arguments.get(2).copied().unwrap_or(0) as usize;
            let text = arguments.get(3..3 + text_len).map(String::from_utf8_lossy).unwrap_or_default();
            bail!("the broker closed: {text}");
        }
        return Ok((class, method, arguments));
    }
}

async fn expect_method(socket: &mut TcpStream, class: u16, method: u16) -> Result<Vec<u8>> {
    let (got_class, got_method, arguments) = read_method(socket).await?;
    if (got_class, got_method) != (class, method) {
        bail!("expected method {class}.{method}, got {got_class}.{got_method}");
    }
    Ok(arguments)
}

/// Opens a connection with one channel and one consumer on `queue`, and returns its socket.
pub(crate) async fn open_consumer(target: &Target, queue: &str) -> Result<TcpStream> {
    let mut socket =
        TcpStream::connect(&target.address).await.with_context(|| format!("connecting to {}", target.address))?;
    socket.write_all(b"AMQP\x00\x00\x09\x01").await?;
    expect_method(&mut socket, 10, 10).await?; // connection.start
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // client properties: an empty table
    short_string(&mut start_ok, "PLAIN");
    let response = format!("\0{}\0{}", target.user, target.password);
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(response.as_bytes());
    short_string(&mut start_ok, "en_US");
    send_method(&mut socket, 0, 10, 11, &start_ok).await?;
    let tune = expect_method(&mut socket, 10, 30).await?; // connection.tune
    if tune.len() < 8 {
        bail!("a short connection.tune");
    }
    // The broker's channel and frame maximums, and no heartbeats: nothing to answer while idle.
    let mut tune_ok = tune[..6].to_vec();
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    send_method(&mut socket, 0, 10, 31, &tune_ok).await?;
    let mut open = Vec::new();
    short_string(&mut open, &target.vhost);
    short_string(&mut open, "");
    open.push(0);
    send_method(&mut socket, 0, 10, 40, &open).await?;
    expect_method(&mut socket, 10, 41).await?; // connection.open-ok
    send_method(&mut socket, 1, 20, 10, &[0]).await?; // channel.open
    expect_method(&mut socket, 20, 11).await?;
    let mut consume = 0u16.to_be_bytes().to_vec();
    short_string(&mut consume, queue);
    short_string(&mut consume, "");
    consume.push(0); // no-local, no-ack, exclusive, no-wait: all off
    consume.extend_from_slice(&0u32.to_be_bytes()); // arguments: an empty table
    send_method(&mut socket, 1, 60, 20, &consume).await?;
    expect_method(&mut socket, 60, 21).await?; // basic.consume-ok
    Ok(socket)
}
