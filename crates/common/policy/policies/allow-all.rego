# allow-all: every agent request is allowed. For pods that are not
# confidential, where the host is trusted anyway.
package agent_policy

default CreateContainerRequest := true
default CreateSandboxRequest := true
default DestroySandboxRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default ExecProcessRequest := true
default SignalProcessRequest := true
default WaitProcessRequest := true
default ReadStreamRequest := true
default WriteStreamRequest := true
default CloseStdinRequest := true
default TtyWinResizeRequest := true
default ListProcessesRequest := true
default StatsContainerRequest := true
default UpdateContainerRequest := true
default GetOOMEventRequest := true
default GuestDetailsRequest := true
default SetPolicyRequest := true
default CheckRequest := true
default UpdateInterfaceRequest := true
default UpdateRoutesRequest := true
default AddARPNeighborsRequest := true
default ListInterfacesRequest := true
default ListRoutesRequest := true
