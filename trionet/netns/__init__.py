"""A network namespace as the guest (``trionet --netns``), as pasta serves one.

trionet opens a tap in the namespace and plays the virtio-net driver for it
itself: its front end (``frontend.py``) negotiates with its own vhost-user
session over a socketpair, lays the rings out in a memfd, and a native loop
per queue pair (``native/nsdrv.c``) moves frames between the tap and the
rings.  Everything behind the rings (the user-mode stack, multiqueue, flows,
status) is the same as for a VM.
"""
