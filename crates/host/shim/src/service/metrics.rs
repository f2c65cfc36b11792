//! The guest's cgroup statistics of a container as containerd's cgroup v2
//! metrics (what `ctr task metrics` and the kubelet read).

use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::protobuf::MessageField;
use kabuto_protocol::agent::StatsContainerResponse;

pub(super) fn cgroup_metrics(s: &StatsContainerResponse) -> cg2::Metrics {
    cg2::Metrics {
        pids: MessageField::some(cg2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(cg2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(cg2::MemoryStat {
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            anon: s.memory_anon,
            file: s.memory_file,
            ..Default::default()
        }),
        memory_events: MessageField::some(cg2::MemoryEvents {
            oom_kill: s.memory_oom_kill,
            ..Default::default()
        }),
        ..Default::default()
    }
}
