"""The Mandos-compatible key server: config, state, policy, audit and the TLS exchange."""
