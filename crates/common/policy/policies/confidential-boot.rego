# A confidential guest from boot until its one CreateSandbox succeeded:
# only that request (which brings the pod's init-data and with it the
# policy) and health checks. Everything else is denied: the host must not
# create containers, exec or swap the policy before the owner's policy is
# in force.
package agent_policy

default CreateSandboxRequest := true
default CheckRequest := true
