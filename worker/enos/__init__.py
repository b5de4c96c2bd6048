"""EnOS, as the API documents it: its facts (``protocol``), APIM signing (``signing``, pure),
the aiohttp client (``client``: transport and token cache) and the reading of its answers
(``answers``, pure: every gateway string capped and scrubbed, odd shapes unreadable).

May import only the shared ground. The simulator (``worker.sim``) shares ``protocol`` and
``signing``, so one fact lives in one place.
"""
