"""MIDI ports read off the MIDI system's thread, with the driver's timestamps."""
