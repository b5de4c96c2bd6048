"""worker: cancel cached EnOS IoT commands across a fleet, at a controlled rate, with a record."""

__version__ = "0.1.0"
