# A confidential guest whose CreateSandbox failed (init-data refused, a
# policy that does not parse, no TEE): it stays closed. No request has a
# rule, so every request is denied; the host can only kill the VM.
package agent_policy
