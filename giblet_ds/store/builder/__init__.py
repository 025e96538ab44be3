"""Building the store from raw files. Heavy packages (av, encodec, open_clip, nibabel) are
imported inside the stage that needs them, so the pure-numpy parts import cheaply."""
