"""`chroma-agent serve phone --provider twilio|telnyx|plivo|exotel|vonage`: one phone server
for every carrier.

- `carrier`: what a carrier supplies (`Carrier`, `carrier_for`, `PROVIDERS`);
- `media`: what every carrier's media stream shares (`SafeMedia`, `Upsampler2x`, limits);
- `records`: each call's record (`CallRecord`, `Turn`, `CallWatcher`);
- `server`: the server (`PhoneServer`, `create_app`, `run_app`, `serve`);
- one module per carrier (`twilio`, `telnyx`, `plivo`, `exotel`, `vonage`); outbound calls
  (`outbound`), recordings (`recording`).

Nothing is imported here: `chroma-agent serve phone --help` stays light.
"""
