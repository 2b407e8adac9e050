"""The engine on other machines: the Ray Serve app `musicbridge worker` deploys (`app`), the daemon's
client with the engine's face (`client`), and the records that cross between them (`wire`)."""
