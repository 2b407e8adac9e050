"""Live parts: jams, live plays, live notes, the melody a jam follows."""
