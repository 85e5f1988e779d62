"""What dwiflow reads from BIDS and how it names and describes every output (BEP016).

The naming and sidecar text live as data in ``outputs.yaml``; :mod:`.outputs` reads it.
"""
