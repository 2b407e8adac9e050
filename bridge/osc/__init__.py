"""The OSC edge: UDP datagrams, frozen commands, who may send, which files a message may name."""
