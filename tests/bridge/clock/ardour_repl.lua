-- Run by ardour7-lua (Ardour's headless Lua session host) for tests/bridge/clock/test_ardour_real.py:
-- creates a session on the given backend, then runs each line read from stdin as a Lua chunk
-- and answers it on stdout as "@@ ok VALUE" or "@@ err MESSAGE", flushed at once, so the test can
-- drive the transport and read Ardour's playhead while Ardour's OSC surface runs in its own thread.
-- Ardour's own threads print to stdout too; the "@@ " prefix tells answers from their lines.
-- Usage: ardour7-lua ardour_repl.lua SESSION_DIR SESSION_NAME BACKEND
-- BACKEND: "JACK" (the server named by JACK_DEFAULT_SERVER) or "None (Dummy)".

AudioEngine:set_backend (arg[3], "", "")
-- create_session (unlike ardour7-new_empty_session) adds a master bus: the OSC surface selects the
-- master strip for each new client and crashes without one.
local session = create_session (arg[1], arg[2], 48000)
if not session then
	print ("@@ err create_session failed")
	io.stdout:flush ()
	return
end
print ("@@ ok ready")
io.stdout:flush ()

while true do
	local line = io.read ("l")
	if not line or line == "quit" then break end
	local chunk, err = load (line)
	if chunk then
		local ok, value = pcall (chunk)
		if ok then
			print ("@@ ok " .. tostring (value))
		else
			print ("@@ err " .. tostring (value))
		end
	else
		print ("@@ err " .. tostring (err))
	end
	io.stdout:flush ()
end
