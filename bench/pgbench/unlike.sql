-- unlike (post): a user who liked the hot post (-D hot) takes the like back: the like row, its count and its
-- outbox row, one statement, as IM-Backend's POST_LIKE_UNSET with its event. Every transaction takes back a like
-- nobody took back before: client c takes users ul<start + c * slice + 0, 1, ...> of bench.py's pool.
\set n :n + 1
\set i :start + :client_id * :slice + :n - 1
\set slot random(0, 63)
WITH target AS (SELECT id FROM pgb_post_info WHERE id = :hot FOR KEY SHARE),
     del AS (DELETE FROM pgb_post_like WHERE post_id IN (SELECT id FROM target) AND user_id = 'ul' || :i::text
             RETURNING post_id, user_id),
     bump AS (INSERT INTO pgb_counter_slots AS s (kind, target_id, slot, n) SELECT 'post', post_id, :slot, -1 FROM del
              ON CONFLICT (kind, target_id, slot) DO UPDATE SET n = s.n - 1)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'post.unliked', post_id, jsonb_build_object('post_id', post_id, 'user_id', user_id), NULL FROM del;
