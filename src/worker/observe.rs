//! What a fleet run (`pemworker fleet`) sees of the agents it runs in one process: the
//! worker's own loops call an [`Observer`] at the points a measurement needs, and take their
//! probe values from it instead of this host. A worker started by `pemworker -c agent.cfg` has
//! none.

use std::time::Duration;

use crate::probes::{ProbeSpec, Row, Sample};

pub trait Observer: Send + Sync {
    /// The rows of an agent-level probe, instead of reading this host (which N agents in one
    /// process would read N times, measuring the host's /proc rather than the PEM server).
    fn rows(&self, spec: &ProbeSpec) -> Vec<Row>;
    /// A round's samples, as they are handed to the spool.
    fn collected(&self, samples: &[Sample]);
    /// One heartbeat: BEGIN to COMMIT on a session already checked out, and whether the
    /// server recorded it.
    fn heartbeat(&self, round_trip: Duration, ok: bool);
    /// A batch the server stored (committed), less the samples it refused.
    fn stored(&self, samples: &[Sample]);
}
