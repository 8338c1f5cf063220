-- comment like: a new user likes comment -D comment: the like, its count (one of 64 slots) and the outbox row, one
-- statement, as IM-Backend's COMMENT_LIKE_SET with its event.
\set n :n + 1
\set user 5000000000000 + :run * 10000000000 + :n * 1024 + :client_id
\set slot random(0, 63)
WITH target AS (SELECT id, post_id FROM pgb_post_comment_info WHERE id = :comment FOR KEY SHARE),
     ins AS (INSERT INTO pgb_comment_like (comment_id, user_id, post_id, created_at)
             SELECT id, :user::text, post_id, now() FROM target ON CONFLICT DO NOTHING
             RETURNING comment_id, user_id, post_id),
     bump AS (INSERT INTO pgb_counter_slots AS s (kind, target_id, slot, n) SELECT 'comment', comment_id, :slot, 1
              FROM ins ON CONFLICT (kind, target_id, slot) DO UPDATE SET n = s.n + 1)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'comment.liked', post_id, jsonb_build_object('comment_id', comment_id, 'post_id', post_id, 'user_id', user_id),
       NULL
FROM ins;
