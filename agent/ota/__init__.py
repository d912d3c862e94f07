"""Over-the-air bundle updates that never leave the device without a working model.

A persisted state machine (downloading -> verifying -> testing -> active, or failed / rolled_back)
over A/B bundle slots: the new bundle is downloaded (resumably), unpacked safely into the inactive
slot, its signature and every file hash verified, its target checked, its golden canaries run on
this device; only then does an atomic symlink switch make it current. After a crash at any point
the next start resumes or rolls back from the persisted state.
"""
