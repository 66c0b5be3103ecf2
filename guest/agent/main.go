// Command isorun-agent is the isorun guest agent: PID 1 in the microVM,
// serving the host protocol (docs/protocol.md) over virtio-serial.
package main

import "isorun.dev/guest/agent/internal/agent"

func main() { agent.Main() }
