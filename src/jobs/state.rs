//! The engine's mutable state (queue, running jobs, volume holders, idempotency keys in flight)
//! and the claims a request takes on it, as guard values. A request future can be dropped at any
//! `.await` (the client hung up, a proxy reset the stream): every claim is given back when its
//! guard is dropped, unless it was handed over to a stored job first. A leaf of `jobs/`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why a running job is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    Cancelled,
    TimedOut,
    Shutdown,
}

/// What holds a volume name, so that no second job (or deletion) uses it meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// A submission that is being stored.
    Submitting,
    /// A pending or running job.
    Job(Uuid),
    /// `DELETE /api/v1/volumes/{name}` is removing it.
    Deleting,
    /// `PUT /api/v1/volumes/{name}/content` is writing it.
    Uploading,
    /// `POST /api/v1/volumes/{name}/resize` is growing it.
    Resizing,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Submitting => f.write_str("a job being submitted"),
            Holder::Job(id) => write!(f, "job {id}"),
            Holder::Deleting => f.write_str("its deletion"),
            Holder::Uploading => f.write_str("an upload"),
            Holder::Resizing => f.write_str("its resize"),
        }
    }
}

/// A running job, as the engine tracks it.
pub(super) struct Running {
    /// Stops the job's work.
    pub(super) cancel: CancellationToken,
    /// Why it was stopped (the first reason wins).
    pub(super) reason: Arc<Mutex<Option<StopReason>>>,
    /// Becomes `true` once the job is terminal.
    pub(super) done: watch::Receiver<bool>,
}

/// The engine's mutable state, behind one lock (`Shared`).
pub(super) struct State {
    /// Pending jobs in order.
    pub(super) queue: VecDeque<Uuid>,
    /// Submissions admitted but not yet stored; they count against the queue capacity.
    pub(super) reserved: usize,
    pub(super) running: HashMap<Uuid, Running>,
    /// Volume names held by submissions, pending or running jobs, deletions and uploads.
    pub(super) volumes: HashMap<String, Holder>,
    pub(super) max_concurrent: usize,
    pub(super) queue_capacity: usize,
    /// `false` once shutdown began.
    pub(super) accepting: bool,
    /// Scoped idempotency keys of submissions being stored (a second one gets `KeyInFlight`).
    pub(super) keys_in_flight: HashSet<String>,
}

impl State {
    pub(super) fn new(max_concurrent: usize, queue_capacity: usize) -> State {
        State {
            queue: VecDeque::new(),
            reserved: 0,
            running: HashMap::new(),
            volumes: HashMap::new(),
            max_concurrent,
            queue_capacity,
            accepting: true,
            keys_in_flight: HashSet::new(),
        }
    }
}

/// The state, shared by the engine and the guards.
#[derive(Clone)]
pub(super) struct Shared(Arc<Mutex<State>>);

impl Shared {
    pub(super) fn new(state: State) -> Shared {
        Shared(Arc::new(Mutex::new(state)))
    }

    /// Locks the state (a panic elsewhere does not poison it for good).
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A volume name held by a deletion or an upload: given back when dropped.
pub(super) struct VolumeClaim {
    shared: Shared,
    name: String,
    holder: Holder,
}

impl VolumeClaim {
    /// Takes `name` for `holder`, or says who holds it.
    pub(super) fn take(
        shared: &Shared,
        st: &mut State,
        name: &str,
        holder: Holder,
    ) -> Result<VolumeClaim, Holder> {
        if let Some(current) = st.volumes.get(name) {
            return Err(*current);
        }
        st.volumes.insert(name.to_string(), holder);
        Ok(VolumeClaim {
            shared: shared.clone(),
            name: name.to_string(),
            holder,
        })
    }
}

impl Drop for VolumeClaim {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.volumes.get(&self.name) == Some(&self.holder) {
            st.volumes.remove(&self.name);
        }
    }
}

/// What a submission holds while its job is being stored: a queue place, its volume name (as
/// `Holder::Submitting`) and its idempotency key. Dropped, it gives all three back; `admit`
/// hands them over to the stored job instead.
pub(super) struct Admission {
    shared: Shared,
    volume: Option<String>,
    key: Option<String>,
    /// `false` once handed over.
    armed: bool,
}

impl Admission {
    /// Takes the three claims (the caller has checked that they are free).
    pub(super) fn take(
        shared: &Shared,
        st: &mut State,
        volume: Option<&str>,
        key: Option<&str>,
    ) -> Admission {
        st.reserved += 1;
        if let Some(v) = volume {
            st.volumes.insert(v.to_string(), Holder::Submitting);
        }
        if let Some(k) = key {
            st.keys_in_flight.insert(k.to_string());
        }
        Admission {
            shared: shared.clone(),
            volume: volume.map(str::to_string),
            key: key.map(str::to_string),
            armed: true,
        }
    }

    /// The job `id` is stored: its volume name passes to it and it joins the queue (with the
    /// state locked by the caller).
    pub(super) fn admit(mut self, st: &mut State, id: Uuid) {
        self.give_back(st);
        if let Some(v) = self.volume.take() {
            st.volumes.insert(v, Holder::Job(id));
        }
        st.queue.push_back(id);
        self.armed = false;
    }

    fn give_back(&self, st: &mut State) {
        st.reserved = st.reserved.saturating_sub(1);
        if let Some(k) = &self.key {
            st.keys_in_flight.remove(k);
        }
        if let Some(v) = &self.volume
            && st.volumes.get(v) == Some(&Holder::Submitting)
        {
            st.volumes.remove(v);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.armed {
            let shared = self.shared.clone();
            self.give_back(&mut shared.lock());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_admission_gives_everything_back() {
        let shared = Shared::new(State::new(1, 1));
        let admission = {
            let mut st = shared.lock();
            Admission::take(&shared, &mut st, Some("vm-1"), Some("key"))
        };
        {
            let st = shared.lock();
            assert_eq!(st.reserved, 1);
            assert_eq!(st.volumes.get("vm-1"), Some(&Holder::Submitting));
            assert!(st.keys_in_flight.contains("key"));
        }
        drop(admission);
        let st = shared.lock();
        assert_eq!(st.reserved, 0);
        assert!(st.volumes.is_empty() && st.keys_in_flight.is_empty());
    }

    #[test]
    fn an_admitted_job_keeps_its_volume_and_queue_place() {
        let shared = Shared::new(State::new(1, 1));
        let id = Uuid::new_v4();
        {
            let mut st = shared.lock();
            let admission = Admission::take(&shared, &mut st, Some("vm-1"), Some("key"));
            admission.admit(&mut st, id);
        }
        let st = shared.lock();
        assert_eq!(st.reserved, 0);
        assert_eq!(st.volumes.get("vm-1"), Some(&Holder::Job(id)));
        assert!(st.keys_in_flight.is_empty());
        assert_eq!(st.queue.front(), Some(&id));
    }

    #[test]
    fn a_dropped_volume_claim_frees_only_its_own_hold() {
        let shared = Shared::new(State::new(1, 1));
        let claim = {
            let mut st = shared.lock();
            VolumeClaim::take(&shared, &mut st, "vm-1", Holder::Deleting).unwrap()
        };
        {
            let mut st = shared.lock();
            assert_eq!(
                VolumeClaim::take(&shared, &mut st, "vm-1", Holder::Uploading).err(),
                Some(Holder::Deleting)
            );
        }
        drop(claim);
        assert!(shared.lock().volumes.is_empty());
    }
}
