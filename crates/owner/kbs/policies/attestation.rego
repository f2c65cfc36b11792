# Default appraisal policy of kabuto-kbs.
#
# input.claims      verified claims (kabuto-verifier `Claims`)
# input.init_data   {"digest": hex, "data": {...}} when the guest sent init-data
# data.reference    reference values registered by the owner, {name: [values]}
#
# Produces `result`: {"trust_vector": {...}, "status": ..., "reasons": [...]}
# in the EAR (AR4SI) vocabulary: 2 affirming, 32 warning, 96 contraindicated.
package kabuto.attestation

import rego.v1

registered(name) if count(object.get(data.reference, name, [])) > 0

# Executables: the launch measurement (SNP MEASUREMENT / TDX MRTD).
executables := 2 if {
	input.claims.measurement in data.reference.measurement
} else := 33 if {
	not registered("measurement")
} else := 96

# Configuration: the init-data digest fixed into the TEE at launch.
configuration := 2 if {
	input.claims.init_data in data.reference.init_data
} else := 33 if {
	not registered("init_data")
} else := 96

# Hardware: a real TEE that cannot be debugged. The software TEE only gets
# this far when the owner trusted its root explicitly; it stays a warning.
hardware := 96 if {
	input.claims.debug
	not "debug" in object.get(data.reference, "allow", [])
} else := 32 if {
	input.claims.insecure
} else := 2

trust_vector := {
	"executables": executables,
	"configuration": configuration,
	"hardware": hardware,
}

reasons contains "launch measurement is not a registered reference value" if executables == 96

reasons contains "init-data digest is not a registered reference value" if configuration == 96

reasons contains "the guest can be debugged" if hardware == 96

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
