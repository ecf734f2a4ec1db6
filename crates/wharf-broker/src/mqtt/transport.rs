//! What an MQTT connection runs over: a plain TCP socket or a TLS stream (`--mqtts-listen`, the
//! AMQPS certificate settings). Split into a reading half, which fills the connection's read
//! buffer, and a writing half for the writer task. Over plain TCP an idle connection holds no read
//! buffer while it waits (it waits for readability first); a TLS stream keeps rustls's own.

use bytes::BytesMut;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

/// Bytes read from the socket at a time.
pub(super) const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A stream an MQTT connection can run over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: Fill;
    type Writer: AsyncWrite + Unpin + Send + 'static;
    fn split_halves(self) -> (Self::Reader, Self::Writer);
}

/// The reading half: more bytes into the connection's buffer.
pub(crate) trait Fill: Send + Sync + 'static {
    /// Reads more bytes into `buffer`; the text says why the stream is done.
    fn fill(&mut self, buffer: &mut BytesMut) -> impl Future<Output = Result<usize, String>> + Send;
}

impl Transport for TcpStream {
    type Reader = OwnedReadHalf;
    type Writer = OwnedWriteHalf;
    fn split_halves(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
}

impl Fill for OwnedReadHalf {
    /// An idle connection (the usual state of a device) holds no read buffer while it waits: a
    /// drained buffer's memory is let go, and a new one is taken only when bytes are there
    /// (10,000 idle devices would otherwise hold 160 MiB).
    async fn fill(&mut self, buffer: &mut BytesMut) -> Result<usize, String> {
        if buffer.is_empty() && buffer.capacity() > 0 {
            *buffer = BytesMut::new();
        }
        loop {
            self.readable().await.map_err(|error| error.to_string())?;
            buffer.reserve(READ_CHUNK_BYTES);
            match self.try_read_buf(buffer) {
                Ok(0) => return Err("the client closed the socket".into()),
                Ok(read) => return Ok(read),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error.to_string()),
            }
        }
    }
}

impl Transport for TlsStream<TcpStream> {
    type Reader = tokio::io::ReadHalf<TlsStream<TcpStream>>;
    type Writer = tokio::io::WriteHalf<TlsStream<TcpStream>>;
    fn split_halves(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }
}

impl Fill for tokio::io::ReadHalf<TlsStream<TcpStream>> {
    async fn fill(&mut self, buffer: &mut BytesMut) -> Result<usize, String> {
        read_more(self, buffer).await
    }
}

/// Reads more bytes into `buffer` from any stream (before login, and over TLS).
pub(super) async fn read_more<R: AsyncRead + Unpin>(reader: &mut R, buffer: &mut BytesMut) -> Result<usize, String> {
    buffer.reserve(READ_CHUNK_BYTES);
    match reader.read_buf(buffer).await {
        Ok(0) => Err("the client closed the socket".into()),
        Ok(read) => Ok(read),
        Err(error) => Err(error.to_string()),
    }
}
