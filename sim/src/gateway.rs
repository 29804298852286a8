//! The gateway host: the real reference gateway (`confab_gateway::server::serve`) on a
//! simulated TCP listener, the simulated clock and seeded randomness, with its SQLite file
//! outside the host so that it survives crashes. A crash drops everything in memory
//! (sessions, resume tokens, rate-limit state); what the store committed stays, as after
//! the death of a real process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use confab_gateway::handler::GatewayConfig;
use confab_gateway::server::{self, Environment};
use confab_gateway::store::sqlite::SqliteStore;
use tokio::sync::oneshot;

use crate::device::{GATEWAY_PORT, derive_seed, seeded_entropy, sim_now};
use crate::world::Shared;

/// What the gateway host runs with.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// Its settings.
    pub config: GatewayConfig,
    /// Its SQLite file.
    pub db: PathBuf,
    /// The run's seed.
    pub seed: u64,
}

/// turmoil's TCP listener as an axum listener.
struct SimListener(turmoil::net::TcpListener);

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                // As axum's TCP listener does: an accept error is retried after a pause.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The gateway host's software: serves until crashed or stopped through
/// [`crate::world::GatewaySlot::stop`].
pub async fn run_gateway(world: Shared, spec: Rc<GatewaySpec>) -> turmoil::Result {
    let (stop, stopped) = oneshot::channel::<()>();
    let incarnation = {
        let mut w = world.borrow_mut();
        w.gateway.incarnation += 1;
        w.gateway.stop = Some(stop);
        w.gateway.incarnation
    };
    let store = SqliteStore::open(&spec.db)?;
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", GATEWAY_PORT)).await?;
    let env = Environment {
        metrics: None,
        clock: Arc::new(sim_now),
        entropy: seeded_entropy(derive_seed(spec.seed, "gateway", u64::from(incarnation))),
    };
    server::serve(
        SimListener(listener),
        spec.config.clone(),
        store,
        env,
        async move {
            let _ = stopped.await;
        },
    )
    .await?;
    Ok(())
}
