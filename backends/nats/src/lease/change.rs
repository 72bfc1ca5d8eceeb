//! Acquire and release: the lease operations that change a key's lease set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bgtask_core::{Acquired, Error, ErrorKind, LeaseId, LeaseRequest, Result};

use super::{encode, Lease, Leases, Outcome};
use crate::js::Deleted;
use crate::time::nanos;

impl Leases {
    pub(crate) async fn acquire(&self, key: &str, request: &LeaseRequest) -> Result<Acquired> {
        let subject = self.subjects.lease(key)?;
        let ttl = Duration::from_millis(request.ttl_millis());
        if ttl > self.max_ttl() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "nats: a lease of {ttl:?} is longer than the {:?} this backend keeps \
                     anything (NatsConfig::lease_max_ttl, or the lease stream's max_age)",
                    self.max_ttl()
                ),
            ));
        }
        let id = request.lease_id();
        let clock = AtomicU64::new(0);
        let guess_absent =
            AtomicBool::new(request.cap != Some(0) && !self.store.had_record(&subject));
        self.run("acquire a lease", || {
            self.try_acquire(&subject, &id, request, ttl, &clock, &guess_absent)
        })
        .await
    }

    async fn try_acquire(
        &self,
        subject: &str,
        id: &LeaseId,
        request: &LeaseRequest,
        ttl: Duration,
        clock: &AtomicU64,
        guess_absent: &AtomicBool,
    ) -> Result<Outcome<Acquired>> {
        if guess_absent.swap(false, Ordering::Relaxed) {
            // Most keys have no record (their last lease was released): create it outright, a
            // write the server refuses if there is one, and the read is saved. If refused, the
            // usual way below finds out what is there.
            let data = encode(&[], Some((id.as_str(), &request.note, nanos(ttl))));
            self.check_size(&data, 1)?;
            if let Outcome::Done(()) = self.write(subject, 0, ttl, data).await? {
                return Ok(Outcome::Done(Acquired {
                    lease: Some(id.clone()),
                    live: 1,
                }));
            }
        }
        let (state, now) = match self.store.snapshot(subject, clock).await? {
            Outcome::Done(found) => found,
            Outcome::Conflict => return Ok(Outcome::Conflict),
            Outcome::NoStream => return Ok(Outcome::NoStream),
        };
        let live = state.live(now);
        let count = live.len() as u64;
        if request.cap.is_some_and(|cap| count >= cap) {
            return Ok(Outcome::Done(Acquired {
                lease: None,
                live: count,
            }));
        }
        let ttl_nanos = nanos(ttl);
        let longest = live
            .iter()
            .map(|l| l.expires.saturating_sub(now))
            .max()
            .unwrap_or(0)
            .max(ttl_nanos);
        let data = encode(&live, Some((id.as_str(), &request.note, ttl_nanos)));
        self.check_size(&data, live.len() + 1)?;
        let outcome = self
            .write(subject, state.seq, Duration::from_nanos(longest), data)
            .await?;
        Ok(outcome.map(|_| Acquired {
            lease: Some(id.clone()),
            live: count + 1,
        }))
    }

    pub(crate) async fn release(&self, key: &str, lease: &LeaseId) -> Result<bool> {
        let subject = self.subjects.lease(key)?;
        let clock = AtomicU64::new(0);
        self.run("release a lease", || {
            self.try_release(&subject, lease, &clock)
        })
        .await
    }

    async fn try_release(
        &self,
        subject: &str,
        lease: &LeaseId,
        clock: &AtomicU64,
    ) -> Result<Outcome<bool>> {
        let (state, now) = match self.store.snapshot(subject, clock).await? {
            Outcome::Done(found) => found,
            Outcome::Conflict => return Ok(Outcome::Conflict),
            Outcome::NoStream => return Ok(Outcome::NoStream),
        };
        let Some(found) = state.leases.iter().find(|l| l.id == lease.as_str()) else {
            self.collect_garbage(&state, now).await;
            return Ok(Outcome::Done(false));
        };
        let was_live = found.expires > now;
        let rest: Vec<Lease> = state
            .live(now)
            .into_iter()
            .filter(|l| l.id != lease.as_str())
            .collect();
        if rest.is_empty() {
            return Ok(match self.store.js.delete(state.seq).await? {
                Deleted::Yes => {
                    self.store.saw(subject, false);
                    Outcome::Done(was_live)
                }
                Deleted::Gone => Outcome::Conflict,
                Deleted::NoStream => Outcome::NoStream,
            });
        }
        let longest = rest
            .iter()
            .map(|l| l.expires.saturating_sub(now))
            .max()
            .unwrap_or(0);
        let data = encode(&rest, None);
        let outcome = self
            .write(subject, state.seq, Duration::from_nanos(longest), data)
            .await?;
        Ok(outcome.map(|_| was_live))
    }
}
