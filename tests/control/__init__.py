"""Tests of the control protocol, the control server and guardctl."""
