# Default resource policy of kabuto-kbs: any guest whose attestation was not
# contraindicated may read any resource. Owners narrow this per path.
#
# input            the attestation token's claims, in trustee's EAR layout:
#                  input.submods.cpu0["ear.status"], ["ear.trustworthiness-vector"],
#                  ["ear.veraison.annotated-evidence"] (claims under the TEE's
#                  name, init_data, init_data_claims, runtime_data_claims)
# input.resource   {"repository", "type", "tag", "path"}
# data             {"resource-path": "<repository>/<type>/<tag>", "plugin": "resource",
#                   "reference": {name: [values]}}
#
# A trustee resource policy that reads input.submods and data["resource-path"]
# works unchanged.
package kabuto.resource

import rego.v1

default allow := false

allow if input.submods.cpu0["ear.status"] != "contraindicated"
