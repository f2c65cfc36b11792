# Default resource policy of kabuto-kbs: any guest whose attestation was not
# contraindicated may read any resource. Owners narrow this per path.
#
# input.token      the attestation token's claims ("ear.status", "claims", ...)
# input.resource   {"repository", "type", "tag", "path"}
package kabuto.resource

import rego.v1

default allow := false

allow if input.token["ear.status"] != "contraindicated"
