# The confidential default: deny by default. What could change the workload
# or read its data (creating containers, exec, reading or writing streams,
# replacing the policy, changing resources) is denied unless the pod's own
# policy allows it; lifecycle and observation requests are allowed.
package agent_policy

default CreateContainerRequest := false
default ExecProcessRequest := false
default SetPolicyRequest := false
default ReadStreamRequest := false
default WriteStreamRequest := false
default UpdateContainerRequest := false

default CreateSandboxRequest := true
default DestroySandboxRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default SignalProcessRequest := true
default WaitProcessRequest := true
default CloseStdinRequest := true
default TtyWinResizeRequest := true
default ListProcessesRequest := true
default StatsContainerRequest := true
default GetOOMEventRequest := true
default GuestDetailsRequest := true
default CheckRequest := true
default ListInterfacesRequest := true
default ListRoutesRequest := true
