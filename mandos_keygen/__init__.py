"""``mandos-keygen``: make a client's keys and its clients.conf section."""
