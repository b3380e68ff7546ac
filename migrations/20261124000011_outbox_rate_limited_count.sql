-- How many times in a row a row's CRM answered 429 (a 429 uses no attempt). Zoho answers 429
-- without Retry-After both for its concurrency limit (seconds) and for its rolling 24-hour API
-- credits (hours): a row asked again every second or two for hours would keep earning 429s, so
-- the wait grows with this count, and a retry or a wait for another reason resets it.
ALTER TABLE integrations_outbox ADD COLUMN rate_limited int NOT NULL DEFAULT 0;
