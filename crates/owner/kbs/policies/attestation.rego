# Default appraisal policy of kabuto-kbs. It fails closed: a claim the owner
# registered no reference values for is contraindicated, not a warning.
#
# input.claims      verified claims (kabuto-verifier `Claims`)
# input.init_data   {"digest": hex, "data": {...}} when the guest sent init-data
# data.reference    reference values registered by the owner, {name: [values]}:
#   measurement         SNP MEASUREMENT / TDX MRTD (hex)            required
#   init_data           init-data digests, as the TEE holds them     required
#   rtmr0 ... rtmr3     TDX runtime measurement registers (hex)      required for TDX
#   tdx_tcb_status      TCB statuses accepted besides "UpToDate"     optional
#   snp_min_tcb         [{"bootloader": n, "tee": n, "snp": n, "microcode": n}]:
#                       the lowest SNP TCB accepted (any one entry)  required for SNP
#   allow               ["debug"] accepts debuggable guests          optional
#
# Produces `result`: {"trust_vector": {...}, "status": ..., "reasons": [...]}
# in the EAR (AR4SI) vocabulary: 2 affirming, 32 warning, 96 contraindicated.
package kabuto.attestation

import rego.v1

reference(name) := object.get(data.reference, name, [])

registered(name) if count(reference(name)) > 0

is_tdx if input.claims.platform == "intel-tdx"

# The TDX RTMRs (kernel, command line, initrd and what the guest extends);
# the quote signs them, and the verifier replayed the event log against them.
tdx_rtmrs_match if {
	every i, value in input.claims.details.rtmr {
		value in reference(sprintf("rtmr%d", [i]))
	}
}

# Executables: the launch measurement (SNP MEASUREMENT, which covers the
# kernel, initrd and command line when launched with kernel-hashes; TDX MRTD
# plus RTMR0-3).
executables := 96 if {
	not input.claims.measurement in reference("measurement")
} else := 96 if {
	is_tdx
	not tdx_rtmrs_match
} else := 2

# Configuration: the init-data digest fixed into the TEE at launch.
configuration := 2 if {
	input.claims.init_data in reference("init_data")
} else := 96

is_snp if input.claims.platform == "amd-sev-snp"

# The platform's TCB (firmware and microcode SVNs, which the VCEK/VLEK
# certifies) at or above a floor the owner registered: a host cannot run
# the measured guest on firmware with known breaks.
snp_tcb_accepted if {
	some floor in reference("snp_min_tcb")
	every field in ["bootloader", "tee", "snp", "microcode"] {
		input.claims.tcb[field] >= floor[field]
	}
}

tdx_tcb_accepted if input.claims.tcb.status == "UpToDate"

tdx_tcb_accepted if input.claims.tcb.status in reference("tdx_tcb_status")

# Hardware: a real TEE that cannot be debugged, at an accepted TCB level. The
# software TEE only gets this far when the owner trusted its root
# explicitly; it stays a warning.
hardware := 96 if {
	input.claims.debug
	not "debug" in reference("allow")
} else := 96 if {
	is_tdx
	not tdx_tcb_accepted
} else := 96 if {
	is_snp
	not snp_tcb_accepted
} else := 96 if {
	# A migration agent could export the guest's memory.
	is_snp
	input.claims.details.migrate_ma
} else := 32 if {
	input.claims.insecure
} else := 2

trust_vector := {
	"executables": executables,
	"configuration": configuration,
	"hardware": hardware,
}

reasons contains "no reference values are registered for the launch measurement (reference-values \"measurement\")" if {
	not registered("measurement")
}

reasons contains "launch measurement is not a registered reference value" if {
	registered("measurement")
	not input.claims.measurement in reference("measurement")
}

reasons contains sprintf("TDX RTMR%d is not a registered reference value (reference-values \"rtmr%d\")", [i, i]) if {
	is_tdx
	some i, value in input.claims.details.rtmr
	not value in reference(sprintf("rtmr%d", [i]))
}

reasons contains "no reference values are registered for the init-data digest (reference-values \"init_data\")" if {
	not registered("init_data")
}

reasons contains "init-data digest is not a registered reference value" if {
	registered("init_data")
	not input.claims.init_data in reference("init_data")
}

reasons contains "the guest can be debugged" if {
	input.claims.debug
	not "debug" in reference("allow")
}

reasons contains "the SNP TCB is below every registered floor (reference-values \"snp_min_tcb\")" if {
	is_snp
	not snp_tcb_accepted
}

reasons contains "the SNP guest policy allows a migration agent" if {
	is_snp
	input.claims.details.migrate_ma
}

reasons contains sprintf("TDX TCB status %v is not accepted (reference-values \"tdx_tcb_status\")", [input.claims.tcb.status]) if {
	is_tdx
	not tdx_tcb_accepted
}

status := "contraindicated" if {
	some v in trust_vector
	v >= 96
} else := "warning" if {
	some v in trust_vector
	v >= 32
} else := "affirming"

result := {
	"trust_vector": trust_vector,
	"status": status,
	"reasons": reasons,
}
