"""qvmd's nftables firewall: pure ruleset builder, apply layer, port forwards, doctor."""
