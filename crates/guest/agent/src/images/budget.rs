//! How much guest memory a pull's tmpfs may take, and the measurements
//! the pull log line reports.

use crate::error::{AgentError, Result};

/// Starts a new peak-RSS measurement (Linux: `5` to `clear_refs`); the
/// unpacked rootfs is tmpfs, so the peak is the blobs the pull held.
pub(super) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM of this process, in KiB.
pub(super) fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The guest's available memory now, in bytes.
pub(super) fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The smallest tmpfs a pull gets.
const MIN_PULL_TMPFS: u64 = 16 << 20;

/// The tmpfs sizes of the pulls in flight. A tmpfs takes memory only as it
/// fills, so `MemAvailable` does not show what running pulls will still
/// use: all pulls together get at most half of the available memory (the
/// rest is for their blobs and the pod), each reserving its size until it
/// ends (a finished rootfs then shows in `MemAvailable` itself).
#[derive(Default)]
pub(crate) struct PullBudget {
    reserved: std::sync::Mutex<u64>,
    /// Notified when a pull gives its share back.
    released: std::sync::Condvar,
}

/// One pull's share of the [`PullBudget`], given back when dropped.
pub(crate) struct PullReservation<'a> {
    budget: &'a PullBudget,
    pub size: u64,
}

impl PullBudget {
    /// Reserves a tmpfs size for one more pull, given `available` bytes of
    /// guest memory; refused when the pulls in flight hold the budget.
    pub(crate) fn reserve(&self, available: u64) -> Result<PullReservation<'_>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let size = (available / 2).saturating_sub(*reserved) & !4095;
        if size < MIN_PULL_TMPFS {
            return Err(AgentError::Image(format!(
                "not enough guest memory for another image pull: the pulls in flight hold {} MiB of {} MiB available; retry when they finish, or give the VM more memory",
                *reserved >> 20,
                available >> 20
            )));
        }
        *reserved += size;
        Ok(PullReservation { budget: self, size })
    }
}

impl Drop for PullReservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self
            .budget
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *reserved = reserved.saturating_sub(self.size);
        self.budget.released.notify_all();
    }
}

impl PullBudget {
    /// [`PullBudget::reserve`], waiting while pulls in flight hold the
    /// budget (until `deadline`): concurrent pulls run one after another
    /// instead of failing.
    pub(crate) fn reserve_waiting(
        &self,
        available: impl Fn() -> u64,
        deadline: std::time::Instant,
    ) -> Result<PullReservation<'_>> {
        loop {
            let refused = match self.reserve(available()) {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let now = std::time::Instant::now();
            let reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            // Nothing in flight to wait for, or no time left: refused.
            if now >= deadline || *reserved == 0 {
                return Err(refused);
            }
            let wait = (deadline - now).min(std::time::Duration::from_secs(1));
            let _ = self.released.wait_timeout(reserved, wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn concurrent_pulls_share_half_of_the_available_memory() {
        let budget = PullBudget::default();
        let available = 1024 << 20;
        let first = budget.reserve(available).expect("first pull");
        assert_eq!(first.size, 512 << 20);
        // While the first is in flight its tmpfs has not filled, so the
        // same MemAvailable is seen: the second gets what is left.
        let refused = budget
            .reserve(available)
            .err()
            .expect("the budget is spent");
        assert!(
            refused
                .to_string()
                .contains("the pulls in flight hold 512 MiB of 1024 MiB"),
            "{refused}"
        );
        // With more memory free, a second pull gets the rest of the half.
        let second = budget.reserve(available * 2).expect("second pull");
        assert_eq!(second.size, 512 << 20);
        drop(second);
        drop(first);
        let third = budget.reserve(available).expect("third pull");
        assert_eq!(
            third.size,
            512 << 20,
            "finished pulls give their share back"
        );

        // A pull that finds the budget spent waits for the one in flight.
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                budget
                    .reserve_waiting(
                        || available,
                        std::time::Instant::now() + std::time::Duration::from_secs(10),
                    )
                    .map(|r| r.size)
                    .ok()
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(third);
            assert_eq!(waiter.join().ok().flatten(), Some(512 << 20));
        });
        // ... until its deadline.
        let held = budget.reserve(available).expect("held");
        let started = std::time::Instant::now();
        assert!(budget
            .reserve_waiting(
                || available,
                started + std::time::Duration::from_millis(300)
            )
            .is_err());
        drop(held);
    }
}
