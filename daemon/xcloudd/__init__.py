"""xcloudd: run Xcode Cloud builds on schedules and follow every build to the end."""

__version__ = "0.1.0"
