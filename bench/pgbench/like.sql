-- like (post): a new user likes the hot post (-D hot): the like, its count (one of 64 counter slots, at random)
-- and its outbox row, one statement, as IM-Backend's POST_LIKE_SET with its event.
\set n :n + 1
\set user 5000000000000 + :run * 10000000000 + :n * 1024 + :client_id
\set slot random(0, 63)
WITH target AS (SELECT id FROM pgb_post_info WHERE id = :hot FOR KEY SHARE),
     ins AS (INSERT INTO pgb_post_like (post_id, user_id, created_at)
             SELECT id, :user::text, now() FROM target ON CONFLICT DO NOTHING RETURNING post_id, user_id),
     bump AS (INSERT INTO pgb_counter_slots AS s (kind, target_id, slot, n) SELECT 'post', post_id, :slot, 1 FROM ins
              ON CONFLICT (kind, target_id, slot) DO UPDATE SET n = s.n + 1)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'post.liked', post_id, jsonb_build_object('post_id', post_id, 'user_id', user_id), NULL FROM ins;
