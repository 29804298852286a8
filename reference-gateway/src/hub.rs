//! The fan-out hub: which connections follow which streams, and a bounded queue of
//! appended entries to each. An append wakes only the connections subscribed to its
//! stream, so its cost grows with the stream's subscribers, not with every open
//! connection.
//!
//! The hub never holds an entry the store does not: a connection that misses a message
//! (its queue was full) is told so and re-reads all its subscriptions from the store, and
//! a connection that receives an entry out of order reads the store from where it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::handler::LiveEntry;
use crate::store::StreamKey;

/// Messages a connection's hub queue holds; beyond it the connection is marked lagged.
pub const QUEUE: usize = 1_024;

/// What the hub carries: a stream grew, and the entry when subscribers may take it from
/// memory.
#[derive(Clone)]
pub struct Appended {
    /// The stream.
    pub stream: StreamKey,
    /// The entry, for application messages and proposals.
    pub entry: Option<Arc<LiveEntry>>,
}

/// How the hub reaches one connection.
struct Follower {
    queue: mpsc::Sender<Appended>,
    lagged: Arc<AtomicBool>,
}

/// Every connection's subscriptions. Followers are kept in connection order, so that an
/// append wakes them in the same order every time (a simulation replays a seed exactly).
#[derive(Default)]
pub struct Hub {
    followers: Mutex<HashMap<StreamKey, BTreeMap<u64, Follower>>>,
}

impl Hub {
    /// Tells the followers of `appended.stream`.
    pub fn publish(&self, appended: &Appended) {
        let Ok(followers) = self.followers.lock() else {
            return;
        };
        let Some(connections) = followers.get(&appended.stream) else {
            return;
        };
        for follower in connections.values() {
            if let Err(mpsc::error::TrySendError::Full(_)) =
                follower.queue.try_send(appended.clone())
            {
                follower.lagged.store(true, Ordering::Release);
            }
        }
    }
}

/// One connection's side of the hub.
pub struct Following {
    id: u64,
    streams: BTreeSet<StreamKey>,
    queue: Option<(mpsc::Sender<Appended>, mpsc::Receiver<Appended>)>,
    lagged: Arc<AtomicBool>,
}

impl Following {
    /// Connection `id`, following nothing (no queue is allocated until it follows).
    pub fn new(id: u64) -> Self {
        Self {
            id,
            streams: BTreeSet::new(),
            queue: None,
            lagged: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Follows exactly `streams`; returns those newly followed, which the caller must
    /// read from the store once (an append between its subscribe and now was not sent
    /// here).
    pub fn follow(&mut self, hub: &Hub, streams: Vec<StreamKey>) -> Vec<StreamKey> {
        let wanted: BTreeSet<StreamKey> = streams.into_iter().collect();
        if wanted == self.streams {
            return Vec::new();
        }
        let Ok(mut followers) = hub.followers.lock() else {
            return Vec::new();
        };
        for gone in self.streams.difference(&wanted) {
            if let Some(connections) = followers.get_mut(gone) {
                connections.remove(&self.id);
                if connections.is_empty() {
                    followers.remove(gone);
                }
            }
        }
        let new: Vec<StreamKey> = wanted.difference(&self.streams).copied().collect();
        if !new.is_empty() {
            let sender = &self.queue.get_or_insert_with(|| mpsc::channel(QUEUE)).0;
            for stream in &new {
                followers.entry(*stream).or_default().insert(
                    self.id,
                    Follower {
                        queue: sender.clone(),
                        lagged: self.lagged.clone(),
                    },
                );
            }
        }
        self.streams = wanted;
        new
    }

    /// The next appended entry of a followed stream (pending forever while following
    /// nothing).
    pub async fn next(&mut self) -> Appended {
        match self.queue.as_mut() {
            Some((_, rx)) => match rx.recv().await {
                Some(appended) => appended,
                // Unreachable: this side holds a sender.
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Whether a message was dropped for a full queue since the last call.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    /// Stops following everything.
    pub fn leave(&mut self, hub: &Hub) {
        self.follow(hub, Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_spec::ids::ConversationId;

    fn stream(n: u8) -> StreamKey {
        StreamKey::Conversation(ConversationId([n; 32]))
    }

    #[tokio::test]
    async fn only_followers_of_a_stream_hear_of_it_and_a_full_queue_marks_lagging() {
        let hub = Hub::default();
        let mut a = Following::new(1);
        let mut b = Following::new(2);
        assert_eq!(a.follow(&hub, vec![stream(1)]), vec![stream(1)]);
        assert_eq!(b.follow(&hub, vec![stream(2)]), vec![stream(2)]);
        assert!(a.follow(&hub, vec![stream(1)]).is_empty(), "nothing new");
        hub.publish(&Appended {
            stream: stream(2),
            entry: None,
        });
        assert!(b.next().await.stream == stream(2));
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(20), a.next()).await;
        assert!(nothing.is_err(), "a does not follow stream 2");
        for _ in 0..QUEUE + 3 {
            hub.publish(&Appended {
                stream: stream(1),
                entry: None,
            });
        }
        assert!(a.take_lagged());
        assert!(!a.take_lagged(), "reported once");
        assert!(!b.take_lagged());
        a.leave(&hub);
        b.follow(&hub, vec![]);
        assert!(hub.followers.lock().expect("lock").is_empty());
    }
}
