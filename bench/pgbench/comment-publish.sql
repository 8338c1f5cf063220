-- comment publish: a new root comment on the hot post (-D hot), the post's comment count (one of 64 slots) and
-- the outbox row, one statement.
\set n :n + 1
\set id 5000000000000 + :run * 10000000000 + :n * 1024 + :client_id
\set slot random(0, 63)
WITH inserted AS (
    INSERT INTO pgb_post_comment_info (id, user_id, root_id, father_id, target_user_id, post_id, content, extra,
                                       created_at, updated_at)
    VALUES (:id, 'bench_user', 0, 0, NULL, :hot,
            'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk', NULL, now(), now())),
     bump AS (INSERT INTO pgb_counter_slots AS s (kind, target_id, slot, n) VALUES ('comments', :hot, :slot, 1)
              ON CONFLICT (kind, target_id, slot) DO UPDATE SET n = s.n + 1)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
VALUES ('comment.published', :hot,
        jsonb_build_object('comment_id', :id::bigint, 'post_id', :hot::bigint, 'user_id', 'bench_user',
                           'content', 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk', 'extra', NULL),
        NULL);
