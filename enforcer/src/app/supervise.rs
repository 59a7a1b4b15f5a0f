//! Supervision of the enforcer's serving tasks (listeners, the API, DNS, flow map
//! persistence, policy reloads).
//!
//! A task that fails, panics or ends is logged and started again from its [`Factory`],
//! after a backoff that doubles with each failure in a row (100 ms up to 10 s); a task that
//! then runs for a minute counts as healthy again. Listener tasks are made from a
//! duplicate of a listening socket the supervisor keeps, so the port stays bound (and
//! steered to, and its backlog queued) while the task is down. A task that fails
//! [`Backoff::give_up_after`] times in a row (or whose factory keeps failing) cannot be
//! restarted: [`Supervisor::run`] returns [`GaveUp`], and the enforcer exits **without
//! detaching capture** (fail closed: captured connections are refused until an enforcer is
//! back) instead of leaving workloads uncaptured.
use std::{collections::HashMap, io, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::{
    task::{Id, JoinSet},
    time::Instant,
};

/// A serving task: runs until it fails (it is not meant to end).
pub type TaskFuture = BoxFuture<'static, io::Result<()>>;

/// Makes a serving task afresh: at start and after the previous one ended.
pub type Factory = Arc<dyn Fn() -> io::Result<TaskFuture> + Send + Sync>;

/// When to restart, and when to stop trying.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The wait before the first restart; doubled for each further failure in a row.
    pub first: Duration,
    pub max: Duration,
    /// Failures in a row after which a task is not restarted again.
    pub give_up_after: u32,
    /// A task that ran this long before it ended starts a new count of failures.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(100),
            max: Duration::from_secs(10),
            give_up_after: 10,
            healthy_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait before restarting after `failures` failures in a row (at least one).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// A task that could not be restarted.
#[derive(Debug, thiserror::Error)]
#[error("{task}: {last}; {failures} failures in a row, not restarted again")]
pub struct GaveUp {
    pub task: String,
    pub failures: u32,
    /// How it last ended.
    pub last: String,
}

struct Supervised {
    name: String,
    factory: Factory,
    failures: u32,
}

/// How a run of a task ended (Err: how it failed).
type Ended = Result<(), String>;

/// The serving tasks, each restartable.
pub struct Supervisor {
    backoff: Backoff,
    supervised: Vec<Supervised>,
    running: JoinSet<Ended>,
    /// Which task a running future belongs to, and when it starts (after its delay).
    ids: HashMap<Id, (usize, Instant)>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new(Backoff::default())
    }
}

impl Supervisor {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            supervised: Vec::new(),
            running: JoinSet::new(),
            ids: HashMap::new(),
        }
    }

    /// Starts a task now, and again from `factory` whenever it ends.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        factory: impl Fn() -> io::Result<TaskFuture> + Send + Sync + 'static,
    ) {
        self.supervised.push(Supervised {
            name: name.into(),
            factory: Arc::new(factory),
            failures: 0,
        });
        self.start(self.supervised.len() - 1, Duration::ZERO);
    }

    /// Runs task `index` from its factory after `delay`.
    fn start(&mut self, index: usize, delay: Duration) {
        let factory = self.supervised[index].factory.clone();
        let handle = self.running.spawn(async move {
            tokio::time::sleep(delay).await;
            match factory() {
                Ok(task) => task.await.map_err(|e| format!("failed: {e}")),
                Err(e) => Err(format!("cannot be started: {e}")),
            }
        });
        self.ids
            .insert(handle.id(), (index, Instant::now() + delay));
    }

    /// Serves: restarts every task that ends. Returns only when one cannot be restarted.
    pub async fn run(&mut self) -> GaveUp {
        loop {
            let Some(joined) = self.running.join_next_with_id().await else {
                // Nothing to supervise: serve on.
                return std::future::pending().await;
            };
            let (id, how) = match joined {
                Ok((id, Ok(()))) => (id, "ended".to_owned()),
                Ok((id, Err(e))) => (id, e),
                Err(e) => {
                    let id = e.id();
                    let how = match e.try_into_panic() {
                        Ok(payload) => format!("panicked: {}", panic_message(&*payload)),
                        Err(e) => format!("was cancelled: {e}"),
                    };
                    (id, how)
                }
            };
            let Some((index, started)) = self.ids.remove(&id) else {
                continue;
            };
            let ran = Instant::now().saturating_duration_since(started);
            if let Some(gave_up) = self.ended(index, how, ran) {
                return gave_up;
            }
        }
    }

    /// Task `index` ended `how` after running for `ran`: restart it, or give up.
    fn ended(&mut self, index: usize, how: String, ran: Duration) -> Option<GaveUp> {
        let backoff = self.backoff;
        let t = &mut self.supervised[index];
        if ran >= backoff.healthy_after {
            t.failures = 0;
        }
        t.failures += 1;
        if t.failures >= backoff.give_up_after {
            tracing::error!(task = %t.name, failures = t.failures, "a serving task {how}: not restarted again");
            return Some(GaveUp {
                task: t.name.clone(),
                failures: t.failures,
                last: how,
            });
        }
        let delay = backoff.delay(t.failures);
        tracing::error!(
            task = %t.name,
            failures = t.failures,
            restart_in_ms = delay.as_millis() as u64,
            "a serving task {how}: restarting it"
        );
        self.start(index, delay);
        None
    }

    /// Stops every task (at shutdown).
    pub fn abort_all(&mut self) {
        self.running.abort_all();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    pub(crate) fn quick() -> Backoff {
        Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(40),
            give_up_after: 4,
            healthy_after: Duration::from_secs(60),
        }
    }

    /// A task that fails (an error, then a panic) `failing` times, then serves.
    pub(crate) fn failing_then_serving(
        failing: u32,
        starts: Arc<Mutex<Vec<Instant>>>,
    ) -> impl Fn() -> io::Result<TaskFuture> + Send + Sync + 'static {
        move || {
            let mut s = starts.lock().unwrap();
            s.push(Instant::now());
            let n = s.len() as u32;
            Ok(Box::pin(async move {
                match n {
                    1 if failing >= 1 => Err(io::Error::other("accept: boom")),
                    n if n <= failing => panic!("serving task {n} panics"),
                    _ => std::future::pending().await,
                }
            }) as TaskFuture)
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_maximum() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(5), Duration::from_millis(1600));
        assert_eq!(b.delay(9), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_task_that_fails_twice_is_restarted_after_a_growing_backoff() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut s = Supervisor::new(quick());
        s.spawn("listener", failing_then_serving(2, starts.clone()));
        // Another task, serving all along, is not disturbed.
        let others = Arc::new(AtomicU32::new(0));
        let counted = others.clone();
        s.spawn("other", move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(Box::pin(std::future::pending()) as TaskFuture)
        });
        let ran = tokio::time::timeout(Duration::from_millis(500), s.run()).await;
        assert!(ran.is_err(), "gave up: {:?}", ran.unwrap());
        let starts = starts.lock().unwrap().clone();
        assert_eq!(starts.len(), 3, "started once and restarted twice");
        // The first restart after `first`, the second after twice that.
        assert!(starts[1] - starts[0] >= Duration::from_millis(20));
        assert!(starts[2] - starts[1] >= Duration::from_millis(40));
        assert_eq!(others.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_task_that_cannot_be_restarted_is_given_up_with_how_it_failed() {
        let made = Arc::new(AtomicU32::new(0));
        let count = made.clone();
        let mut s = Supervisor::new(quick());
        // Its first run fails; it cannot be made again (its listener is gone, say).
        s.spawn("outbound listener 127.0.0.1:15001", move || {
            if count.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(Box::pin(async { Err(io::Error::other("accept: boom")) }) as TaskFuture)
            } else {
                Err(io::Error::other("the listener is gone"))
            }
        });
        let gave_up = tokio::time::timeout(Duration::from_secs(5), s.run())
            .await
            .expect("gives up");
        assert_eq!(gave_up.task, "outbound listener 127.0.0.1:15001");
        assert_eq!(gave_up.failures, 4);
        assert_eq!(made.load(Ordering::SeqCst), 4);
        assert_eq!(
            gave_up.to_string(),
            "outbound listener 127.0.0.1:15001: cannot be started: the listener is gone; \
             4 failures in a row, not restarted again"
        );
    }

    #[tokio::test]
    async fn a_task_that_ran_long_enough_starts_a_new_count() {
        let runs = Arc::new(AtomicU32::new(0));
        let count = runs.clone();
        let mut s = Supervisor::new(Backoff {
            give_up_after: 2,
            healthy_after: Duration::from_millis(30),
            ..quick()
        });
        // Each run serves a while, then fails: never twice in a row without a healthy run.
        s.spawn("flaky", move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(Box::pin(async {
                tokio::time::sleep(Duration::from_millis(40)).await;
                Err(io::Error::other("boom"))
            }) as TaskFuture)
        });
        let ran = tokio::time::timeout(Duration::from_millis(400), s.run()).await;
        assert!(ran.is_err(), "gave up: {:?}", ran.unwrap());
        assert!(runs.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn nothing_to_supervise_serves_on() {
        let mut s = Supervisor::default();
        let ran = tokio::time::timeout(Duration::from_millis(50), s.run()).await;
        assert!(ran.is_err());
    }
}
