//! OOM kills: the containers' memory.events polled, each new kill queued
//! for the host's GetOOMEvent.

use super::*;

/// How often the OOM watcher reads the containers' memory.events.
const OOM_POLL: Duration = Duration::from_millis(500);

impl Agent {
    /// Queues an OOM event if the container's cgroup counted new OOM kills.
    pub(super) fn check_oom(&self, id: &str, cgroup: &std::path::Path) {
        let kills = stats::oom_kills(cgroup);
        let before = lock(&self.oom_seen)
            .insert(id.to_string(), kills)
            .unwrap_or(0);
        if kills > before {
            log::info!("container {id}: OOM kill");
            lock(&self.oom_events).push_back(id.to_string());
            self.oom_ready.notify_all();
        }
    }

    /// Watches every container's cgroup for OOM kills (a process other than
    /// init may be the one killed, so exits alone do not tell).
    pub fn start_oom_watch(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        let spawned = thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || loop {
                thread::sleep(OOM_POLL);
                let Some(agent) = agent.upgrade() else { return };
                let dirs: Vec<(String, std::path::PathBuf)> = agent
                    .containers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|c| (c.id.clone(), c.cgroup_dir()))
                    .collect();
                lock(&agent.oom_seen).retain(|id, _| dirs.iter().any(|(d, _)| d == id));
                for (id, dir) in dirs {
                    agent.check_oom(&id, &dir);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the OOM watcher: {e}");
        }
    }

    pub(super) fn get_oom_event(&self, _req: agent::GetOOMEventRequest) -> Result<agent::OOMEvent> {
        let mut events = lock(&self.oom_events);
        loop {
            if let Some(id) = events.pop_front() {
                return Ok(agent::OOMEvent {
                    container_id: id,
                    ..Default::default()
                });
            }
            events = self
                .oom_ready
                .wait(events)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}
