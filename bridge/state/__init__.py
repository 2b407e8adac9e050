"""What the daemon keeps: the live session, its rules and checks, session files, the jobs journal."""
