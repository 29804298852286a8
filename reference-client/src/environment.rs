//! What a client takes from the world besides its files: the wall clock, randomness, and
//! how it opens a byte stream to the gateway. The defaults are the system clock, the OS's
//! randomness and TCP; the simulator (`confab-sim`) passes a simulated clock, seeded
//! randomness and simulated TCP, so that one seed reproduces a run.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use confab_spec::ids::UnixMs;
use tokio::io::{AsyncRead, AsyncWrite};

/// The wall clock (`UnixMs`): session timers, certificate and lifetime checks.
pub type Clock = Arc<dyn Fn() -> UnixMs + Send + Sync>;

/// Fills a buffer with random bytes (msg_ids).
pub type Entropy = Arc<dyn Fn(&mut [u8]) + Send + Sync>;

/// A byte stream a WebSocket runs over: TCP, or simulated TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection attempt in progress.
pub type Dialing = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send>>;

/// Opens a byte stream to `(host, port)`.
pub type Dialer = Arc<dyn Fn(String, u16) -> Dialing + Send + Sync>;

/// The clock, randomness and dialer of one client.
#[derive(Clone)]
pub struct Environment {
    /// The wall clock.
    pub clock: Clock,
    /// Randomness for msg_ids.
    pub entropy: Entropy,
    /// Opens connections.
    pub dialer: Dialer,
}

impl Default for Environment {
    /// The system clock, the OS's randomness and TCP.
    fn default() -> Self {
        Self {
            clock: Arc::new(system_now),
            entropy: Arc::new(|out: &mut [u8]| {
                use rand_core::RngCore as _;
                rand_core::OsRng.fill_bytes(out);
            }),
            dialer: Arc::new(|host: String, port: u16| -> Dialing {
                Box::pin(async move {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    stream.set_nodelay(true)?;
                    Ok(Box::new(stream) as Box<dyn Io>)
                })
            }),
        }
    }
}

/// The system's wall clock.
pub fn system_now() -> UnixMs {
    UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}
