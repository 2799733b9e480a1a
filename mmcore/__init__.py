"""mmpipe core library."""
