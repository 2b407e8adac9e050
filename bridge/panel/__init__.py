"""The front panel: a page in the browser showing the daemon's state live, with its most used controls.

`guard` decides which HTTP and WebSocket requests are answered (token, Host, Origin, peer),
`view` reads the daemon's state into JSON-able records, `thumbs` draws finished stems as
waveform and spectrogram data, and `server` serves the page and pushes the state over a WebSocket.
"""
