//! cgroup v2 statistics and resource updates for one container.

use std::{collections::HashMap, fs, path::Path};

use kabuto_protocol::agent::StatsContainerResponse;
use oci_spec::runtime::LinuxResources;

use crate::error::{AgentError, Result};

fn read_keyed(path: &Path) -> HashMap<String, u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let key = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// Reads a single-value cgroup file; "max" reads as u64::MAX.
fn read_value(path: &Path) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_default();
    let text = text.trim();
    if text == "max" {
        u64::MAX
    } else {
        text.parse().unwrap_or_default()
    }
}

pub fn read(cgroup: &Path) -> Result<StatsContainerResponse> {
    if !cgroup.is_dir() {
        return Err(AgentError::InvalidArgument(format!(
            "cgroup {} does not exist",
            cgroup.display()
        )));
    }
    let cpu = read_keyed(&cgroup.join("cpu.stat"));
    let memory = read_keyed(&cgroup.join("memory.stat"));
    let events = read_keyed(&cgroup.join("memory.events"));
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or_default();
    Ok(StatsContainerResponse {
        cpu_usage_usec: get(&cpu, "usage_usec"),
        cpu_user_usec: get(&cpu, "user_usec"),
        cpu_system_usec: get(&cpu, "system_usec"),
        cpu_nr_periods: get(&cpu, "nr_periods"),
        cpu_nr_throttled: get(&cpu, "nr_throttled"),
        cpu_throttled_usec: get(&cpu, "throttled_usec"),
        memory_usage: read_value(&cgroup.join("memory.current")),
        memory_limit: read_value(&cgroup.join("memory.max")),
        memory_anon: get(&memory, "anon"),
        memory_file: get(&memory, "file"),
        memory_oom_kill: get(&events, "oom_kill"),
        pids_current: read_value(&cgroup.join("pids.current")),
        pids_limit: read_value(&cgroup.join("pids.max")),
        ..Default::default()
    })
}

/// The number of OOM kills in the cgroup so far.
pub fn oom_kills(cgroup: &Path) -> u64 {
    read_keyed(&cgroup.join("memory.events"))
        .get("oom_kill")
        .copied()
        .unwrap_or_default()
}

/// Applies the memory, CPU and pids limits of an update request.
pub fn update(cgroup: &Path, raw: &[u8]) -> Result<()> {
    let resources: LinuxResources = serde_json::from_slice(raw)
        .map_err(|e| AgentError::InvalidArgument(format!("resources are not valid: {e}")))?;
    let mut writes: Vec<(&str, String)> = Vec::new();
    if let Some(memory) = resources.memory() {
        if let Some(limit) = memory.limit() {
            writes.push(("memory.max", limit_value(limit)));
        }
        if let Some(swap) = memory.swap() {
            writes.push(("memory.swap.max", limit_value(swap)));
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(quota) = cpu.quota() {
            let period = cpu.period().unwrap_or(100_000);
            writes.push(("cpu.max", format!("{} {period}", limit_value(quota))));
        }
        if let Some(shares) = cpu.shares() {
            // The conversion runc and crun use from cgroup v1 shares to v2 weight.
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            writes.push(("cpu.weight", weight.to_string()));
        }
    }
    if let Some(pids) = resources.pids() {
        writes.push(("pids.max", limit_value(pids.limit())));
    }
    for (file, value) in writes {
        let path = cgroup.join(file);
        fs::write(&path, &value).map_err(AgentError::io(format!(
            "writing {value} to {}",
            path.display()
        )))?;
    }
    Ok(())
}

fn limit_value(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cgroup_files() -> std::io::Result<()> {
        let dir = tempdir()?;
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 10\nuser_usec 7\nsystem_usec 3\n",
        )?;
        fs::write(dir.join("memory.current"), "4096\n")?;
        fs::write(dir.join("memory.max"), "max\n")?;
        fs::write(dir.join("memory.events"), "low 0\noom 1\noom_kill 2\n")?;
        let stats = read(&dir).expect("stats");
        assert_eq!(stats.cpu_usage_usec, 10);
        assert_eq!(stats.cpu_user_usec, 7);
        assert_eq!(stats.memory_usage, 4096);
        assert_eq!(stats.memory_limit, u64::MAX);
        assert_eq!(stats.memory_oom_kill, 2);
        assert_eq!(oom_kills(&dir), 2);
        fs::remove_dir_all(&dir)
    }

    #[test]
    fn update_writes_limits() -> std::io::Result<()> {
        let dir = tempdir()?;
        update(
            &dir,
            br#"{"memory":{"limit":1048576},"cpu":{"quota":50000,"period":100000},"pids":{"limit":-1}}"#,
        )
        .expect("update");
        assert_eq!(fs::read_to_string(dir.join("memory.max"))?, "1048576");
        assert_eq!(fs::read_to_string(dir.join("cpu.max"))?, "50000 100000");
        assert_eq!(fs::read_to_string(dir.join("pids.max"))?, "max");
        assert!(update(&dir, b"[1]").is_err());
        fs::remove_dir_all(&dir)
    }

    fn tempdir() -> std::io::Result<std::path::PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "kabuto-stats-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}
