"""One thin Ray program per job; each wires Ray Data / Train / Serve around vist3a library calls."""
