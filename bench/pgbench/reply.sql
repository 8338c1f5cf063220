-- reply: a new reply to root comment -D root of the hot post (-D hot): the father must be that root on that post
-- (else nothing is written), the reply names the father's user; the post's comment count and the root's reply
-- count (one of 64 slots each) and the outbox row, one statement. (Ids from 6e12: none of comment-publish.sql.)
\set n :n + 1
\set id 6000000000000 + :run * 10000000000 + :n * 1024 + :client_id
\set slot random(0, 63)
WITH father AS (SELECT id, user_id, post_id FROM pgb_post_comment_info WHERE id = :root AND post_id = :hot AND root_id = 0),
     inserted AS (
         INSERT INTO pgb_post_comment_info (id, user_id, root_id, father_id, target_user_id, post_id, content, extra,
                                            created_at, updated_at)
         SELECT :id, 'bench_user', id, id, user_id, post_id,
                'rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr', NULL, now(), now() FROM father
         RETURNING id, root_id, father_id, target_user_id, post_id),
     bump AS (INSERT INTO pgb_counter_slots AS s (kind, target_id, slot, n)
              SELECT k.kind, k.target, :slot, 1 FROM inserted,
                     LATERAL (VALUES ('children', inserted.root_id), ('comments', inserted.post_id)) AS k (kind, target)
              ON CONFLICT (kind, target_id, slot) DO UPDATE SET n = s.n + 1)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'comment.replied', post_id,
       jsonb_build_object('comment_id', id, 'post_id', post_id, 'root_id', root_id, 'father_id', father_id,
                          'user_id', 'bench_user', 'target_user_id', target_user_id,
                          'content', 'rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr', 'extra', NULL),
       NULL
FROM inserted;
